"""The server's listening socket, bound before the model loads so a taken port fails in a second."""

from __future__ import annotations

import errno
import socket

from llmctl.errors import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening; uvicorn listens on it once the app is
    ready, so a client never connects to a half-started server). Raises ConfigError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host: cannot resolve {host!r} ({err.strerror})",
                          hint="use an address such as 127.0.0.1, 0.0.0.0 or ::1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no obstacle
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port: {host}:{port} is already in use",
                              hint="pick another port with --port, or stop the process that holds it") from None
        if err.errno == errno.EACCES:
            raise ConfigError(f"--port: no permission to bind {host}:{port}",
                              hint="ports below 1024 need privileges; pick one above 1024") from None
        raise ConfigError(f"--host/--port: cannot bind {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock
