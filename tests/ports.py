"""A free TCP port on the loopback interface, for tests that start servers or process groups."""

import socket


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (free now; a server must bind it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
