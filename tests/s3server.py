"""A real S3 endpoint: `moto_server` on a free loopback port, reached through s3fs over
HTTP exactly as S3 would be."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

from daemons import free_port


class MotoServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto_server exited at start") from None
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def options(self) -> dict:
        return {"endpoint_url": self.url, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "eu-west-1"}}  # fmt: skip

    def make_bucket(self, name: str | None = None) -> str:
        import s3fs

        name = name or f"b-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True, **self.options()).mkdir(name)
        return name
