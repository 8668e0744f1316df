"""Make "pick a free port, bind it later" lose its race every time, deterministically.

``squatting()`` patches ``socket.socket`` in this process: when a socket that was bound to port
0 (a "which port is free?" probe, as ``free_port()`` does) is closed, another socket at once
binds that port on 127.0.0.1 and listens on it, as another process on a busy machine might in
the gap. Code that keeps the socket it bound to port 0 (and hands it to its server) never
closes it before use, so it is not affected; code that picks a number and binds it later finds
it taken (``address already in use``), here as on a machine where other test runs use ports.

Only Python sockets are watched: a port libzmq or a child process binds itself is not, but the
probe that chose the number for them is.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class Squatters:
    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.ports: list[int] = []
        self.lock = threading.Lock()

    def take(self, port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            s.close()  # someone (the code under test) holds it: fine
            return
        with self.lock:
            self.sockets.append(s)
            self.ports.append(port)

    def close(self) -> None:
        with self.lock:
            for s in self.sockets:
                s.close()
            self.sockets.clear()


@contextlib.contextmanager
def squatting() -> Iterator[Squatters]:
    squat = Squatters()
    probes: dict[int, int] = {}  # id(socket) -> the port it was given for port 0
    own_bind = "bind" in socket.socket.__dict__  # (inherited from _socket.socket in CPython)
    real_bind = socket.socket.bind
    real_close = socket.socket.close
    active = True

    def bind(self: socket.socket, address) -> None:  # type: ignore[no-untyped-def]
        real_bind(self, address)
        if active and isinstance(address, tuple) and len(address) >= 2 and address[1] == 0 and self.family == socket.AF_INET:
            probes[id(self)] = self.getsockname()[1]

    def close(self: socket.socket) -> None:
        port = probes.pop(id(self), None)
        real_close(self)
        if port is not None and active:
            squat.take(port)

    socket.socket.bind = bind  # type: ignore[method-assign]
    socket.socket.close = close  # type: ignore[method-assign]
    try:
        yield squat
    finally:
        active = False
        if own_bind:
            socket.socket.bind = real_bind  # type: ignore[method-assign]
        else:
            del socket.socket.bind
        socket.socket.close = real_close  # type: ignore[method-assign]
        squat.close()
