"""A real redis-server on 127.0.0.1 for tests and benchmarks (Debian ``redis-server``)."""

from __future__ import annotations

import socket
from pathlib import Path

import redis

from matrixinfer.process import Child, free_port, wait_until

__all__ = ["PasswordRedis", "RedisServer"]


class RedisServer:
    def __init__(
        self, binary: str, directory: Path, extra_args: tuple[str, ...] = (), name: str = "redis"
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.child = Child(
            name,
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), *extra_args],
            log_path=directory / "redis.log",
            ready=self.answers,
            ready_timeout=30,
        )  # fmt: skip

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.child.start()

    def stop(self) -> None:
        self.child.stop()

    def restart(self) -> None:
        self.child.start()
        wait_until(self.answers, 30, "redis answers again")


class PasswordRedis(RedisServer):
    """A redis-server with ``requirepass`` (its own: the shared one has no password)."""

    def __init__(self, binary: str, directory: Path, password: str) -> None:
        self.password = password
        super().__init__(binary, directory, ("--requirepass", password), name="redis-auth")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2
        )

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def change_password(self, new: str) -> None:
        """Set a new password and drop every client connection (they must AUTH again)."""
        c = self.client()
        c.config_set("requirepass", new)
        self.password = new
        c.client_kill_filter(_type="normal", skipme=True)
        c.close()
