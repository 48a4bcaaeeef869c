"""Real servers that the tests start themselves, each on a free loopback port with throwaway
settings and stopped by its own PID: redis-server and nginx (Debian's packages), gunicorn
serving a step's app, and RQ's worker. A program that is not installed skips the tests that
need it, or fails them under CI (require())."""

import contextlib
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
import redis

from helpers import ROOT, TEST_KEY, WAIT, free_port, port_of, wait_until


def installed(program: str) -> str | None:
    """Where `program` is: on PATH, or in the sbin beside a bin on PATH (Debian puts nginx in
    /usr/sbin, outside an ordinary user's PATH)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    folders += [str(Path(f).parent / "sbin") for f in folders if Path(f).name == "bin"]
    return shutil.which(program, path=os.pathsep.join(folders))


# The programs the tests take from the system's packages; None when missing.
REDIS_SERVER = installed("redis-server")
NGINX = installed("nginx")
CHROMIUM = installed("chromium")
CHROMEDRIVER = installed("chromedriver")


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as GitHub Actions and .ci/run set it)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(found: bool, what: str, package: str) -> None:
    """Skip the test when a program is missing, in one line naming its Debian package; under
    CI, where .ci/run installs them all, fail it instead, since a skip there would hide it."""
    if found:
        return
    message = f"needs {what}: apt-get install {package}"
    if in_ci():
        pytest.fail(f"CI=true and {message} (.ci/run installs it)", pytrace=False)
    pytest.skip(message)


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence, in a temporary folder; stop() and
    start() again keep its port, so a test can take Redis away and bring it back. `settings`
    are more of redis.conf's, such as {"maxmemory": "2mb", "maxmemory-policy": "allkeys-lru"}."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        require(bool(REDIS_SERVER), "redis-server", "redis-server")
        self.settings = settings or {}
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.process is not None:  # running already
            return
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port)]
        # No RDB snapshots and no append-only file: nothing is written, nothing outlives the test.
        command += ["--save", "", "--appendonly", "no", "--dir", self.folder]
        command += ["--protected-mode", "no", "--loglevel", "warning"]
        for name, value in self.settings.items():
            command += [f"--{name}", value]
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


class Output:
    """The output of a server in a subprocess, read line by line in a thread of its own:
    wait_for_line() waits for a line, has_logged() looks at those so far."""

    def read_output(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, args=(process,), daemon=True).start()

    def _drain(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
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
        name = type(self).__name__
        raise AssertionError(f"{name} never logged {pattern!r}:\n{''.join(self.log)}")

    def has_logged(self, pattern: str) -> bool:
        """Whether a line so far matches `pattern`; does not wait."""
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return any(re.search(pattern, line) for line in self.log)


class Gunicorn(Output):
    """One gunicorn server in a subprocess on a free loopback port; stopped by its own PID."""

    def __init__(
        self,
        module: str,
        worker: str,
        threads: int = 8,
        extra: Sequence[str] = (),
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.module = module
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", worker]
        command += ["-w", str(workers), "--threads", str(threads), "-b", "127.0.0.1:0", *extra]
        command += [f"{module}:app"]
        # On stop, a worker whose stream is paused in sleep() is killed after 1 s.
        command += ["--graceful-timeout", "1"]
        env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode(), **(env or {})}
        # A session of its own: kill() reaches its workers too, and nothing else.
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.read_output(self.process)
        self.url = self.wait_for_line(r"Listening at: (http://127\.0\.0\.1:\d+)").group(1)
        self.port = port_of(self.url)

    def kill(self) -> None:
        """SIGKILL to master and workers at once: no cleanup, as when a host dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()


class RQWorker(Output):
    """RQ's worker, started as the docs say (`rq worker --url "$REDIS_URL" jobs`, in the
    repository's folder), in a session of its own; kill() takes its work horse too."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None) -> None:
        command = [str(Path(sys.executable).with_name("rq")), "worker", "--url", redis_url, "jobs"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.read_output(self.process)
        self.wait_for_line(r"Listening on jobs")

    def kill(self) -> None:
        """SIGKILL to the worker, then to its work horse (the process that runs the job, which
        RQ puts in a process group of its own, so it outlives a kill of the worker's), as when
        a host dies."""
        horses = psutil.Process(self.process.pid).children(recursive=True)
        os.killpg(self.process.pid, signal.SIGKILL)  # first: it forks no new horse now
        for horse in horses:
            with contextlib.suppress(psutil.NoSuchProcess):
                horse.kill()
        self.process.wait(WAIT)

    def stop(self) -> None:
        """SIGTERM: RQ's warm shutdown, which lets the job under way finish first."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.stdout.close()


class Nginx:
    """Debian's nginx running deploy/nginx.conf from a temporary prefix, the file unchanged but
    for its addresses: it listens on a free port instead of 8080 and proxies to `app_ports`
    instead of 5000 and 5001 (a single port stands for both). `settings` replace the values of
    directives, such as {"client_header_timeout": "1s"}. Started by root, `run_as` names the
    ordinary user to start it as."""

    CONF = ROOT / "deploy" / "nginx.conf"

    def __init__(
        self,
        app_ports: Sequence[int],
        settings: dict[str, str] | None = None,
        run_as: str | None = None,
    ) -> None:
        require(bool(NGINX), "nginx", "nginx-light")
        self.binary = NGINX
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-"))
        # Started by root (as in CI), nginx's workers run as nobody and need to reach the
        # temporary folders it creates in here.
        self.prefix.chmod(0o755)
        (self.prefix / "logs").mkdir()
        text = self.CONF.read_text()
        text = _replace(text, r"listen\s+127\.0\.0\.1:8080", f"listen 127.0.0.1:{self.port}")
        for default, port in ((5000, app_ports[0]), (5001, app_ports[-1])):
            text = _replace(text, rf"server\s+127\.0\.0\.1:{default}", f"server 127.0.0.1:{port}")
        for name, value in (settings or {}).items():
            text = _replace(text, rf"{name}\s[^;]*", f"{name} {value}")
        (self.prefix / "nginx.conf").write_text(text)
        as_user = {}
        if run_as:  # the prefix is the only place nginx writes to: make it the user's
            account = pwd.getpwnam(run_as)
            for path in (self.prefix, self.prefix / "logs", self.prefix / "nginx.conf"):
                os.chown(path, account.pw_uid, account.pw_gid)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        # The README's command; the file says `daemon off;`, so this process is the master.
        # Its own session: if it ever had to be killed, its workers go with it. Once started,
        # nginx sends its stderr to logs/error.log, so the pipe only carries start-up errors.
        command = [self.binary, "-p", f"{self.prefix}/", "-c", "nginx.conf", "-e", "logs/error.log"]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **as_user,
        )
        try:
            wait_until(self._answers)
        except BaseException:
            self.close()
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited at start: {self.process.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def error_log(self) -> str:
        return (self.prefix / "logs" / "error.log").read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown, workers included
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the group it leads, no other
                self.process.wait()
        self.process.stderr.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


def _replace(text: str, pattern: str, replacement: str) -> str:
    """Replace the one directive that starts a line with `pattern`; fail if it is not there."""
    text, count = re.subn(rf"^(\s*){pattern}", rf"\g<1>{replacement}", text, flags=re.MULTILINE)
    assert count == 1, f"deploy/nginx.conf: expected one line matching {pattern!r}, found {count}"
    return text
