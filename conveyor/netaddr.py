"""The address a process advertises in the registry (for Prometheus to scrape it): by default the local address of
the interface it reaches Redis through, which is the pod's IP in Kubernetes, the container's in Compose, and
127.0.0.1 on one host."""

from __future__ import annotations

import socket

from conveyor.redis_client import first_address


def address_towards(redis_url: str) -> str:
    """The local IP this host uses to reach the Redis of ``redis_url`` (or its first sentinel; no packet is sent)."""
    address = first_address(redis_url)
    if address is None:
        return "127.0.0.1"
    try:
        family = socket.getaddrinfo(*address, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect(family[4])
            return str(probe.getsockname()[0])
    except OSError:  # Redis's name does not resolve yet: the registry is refreshed on every heartbeat anyway
        return socket.gethostname()


def host_port(host: str, port: int) -> str:
    """``host:port``, bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
