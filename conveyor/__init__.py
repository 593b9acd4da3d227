"""Conveyor's shared kernel: what the gateway, the workers and the launcher all import."""

from importlib import metadata

try:
    #: the installed distribution's version (pyproject.toml), reported by ``GET /`` and the OpenAPI schema
    VERSION = metadata.version("conveyor")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
