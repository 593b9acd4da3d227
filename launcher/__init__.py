"""The launcher: the ``conveyor`` command, ``conveyor up`` and the processes it starts. It sits above the shared
kernel (``conveyor/``), the gateway and the worker, and is the only package that imports all three."""
