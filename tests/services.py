"""Real servers that the tests start themselves: redis-server (Debian's package), on a free
loopback port with throwaway settings, stopped by its own PID."""

import shutil
import subprocess
import tempfile

import redis

from helpers import free_port, wait_until


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, in a temporary folder; stop() and
    start() again keep its port, so a test can take Redis away and bring it back."""

    def __init__(self) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        # No RDB snapshots and no append-only file: nothing is written, nothing outlives the test.
        command += ["--save", "", "--appendonly", "no", "--dir", self.folder]
        command += ["--protected-mode", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(self._answers)

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert self.process.poll() is None, "redis-server exited at start"
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
