"""Real servers that the tests start themselves, each on a free loopback port with throwaway
settings and stopped by its own PID: redis-server (Debian's package), and gunicorn serving a
step's app."""

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from helpers import TEST_KEY, WAIT, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


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


class Gunicorn:
    """One gunicorn server in a subprocess on a free loopback port; stopped by its own PID."""

    def __init__(self, module: str, worker: str, threads: int = 8) -> None:
        self.module = module
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", worker]
        command += ["-w", "1", "--threads", str(threads), "-b", "127.0.0.1:0", f"{module}:app"]
        # On stop, a worker whose stream is paused in sleep() is killed after 1 s.
        command += ["--graceful-timeout", "1"]
        env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self.wait_for_line(r"Listening at: (http://127\.0\.0\.1:\d+)").group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for_line(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"gunicorn never logged {pattern!r}:\n{''.join(self.log)}")

    def has_logged(self, pattern: str) -> bool:
        """Whether a line so far matches `pattern`; does not wait."""
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return any(re.search(pattern, line) for line in self.log)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
