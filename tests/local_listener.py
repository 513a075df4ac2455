"""A local TCP listener for the sandbox's no-network checks: does anything from the sandboxed code reach it?"""

from __future__ import annotations

import socket


def listener(timeout_s: float = 0.3) -> socket.socket:
    """A listening socket on 127.0.0.1 at a free port (`srv.getsockname()[1]`); accept() times out after timeout_s."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout_s)
    return srv


def received(srv: socket.socket, timeout_s: float = 0.3) -> bytes:
    """What a client sent to `srv`: b"" when nobody connected before the timeout, b"<connected>" when a client
    connected but sent nothing."""
    try:
        conn, _ = srv.accept()
    except (socket.timeout, TimeoutError):
        return b""
    with conn:
        conn.settimeout(timeout_s)
        try:
            return conn.recv(1024) or b"<connected>"
        except (socket.timeout, TimeoutError):
            return b"<connected>"
