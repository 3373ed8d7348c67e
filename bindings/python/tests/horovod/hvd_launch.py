"""Helpers of the Horovod API tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free a moment ago, for torchrun's --master-port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
