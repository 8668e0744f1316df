"""Loopback ports and sockets for the test servers.

A server that can take a socket binds port 0 and reports the port the kernel gave it
(``bound_socket``): nothing can take the port between choosing and binding it. ``free_port`` is
only for what cannot (redis-server, Envoy's config file) or for an address that must stay dead.
"""

from __future__ import annotations

import socket


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (0: any free port). IPPROTO_TCP, not 0:
    asyncio sets TCP_NODELAY only on accepted sockets whose ``proto`` says TCP."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
