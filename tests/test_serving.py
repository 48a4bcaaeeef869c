"""Every step's app, unchanged, under gunicorn's gthread and gevent workers, checked on the
wire; and how gunicorn.conf.py stops, logs and finds the app."""

import base64
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests

import show_chunks
from bench import bench
from helpers import TEST_KEY, WAIT, bearer, token_for, wait_until

ROOT = Path(__file__).resolve().parent.parent
STEPS = {  # module: stream path, where {user} names the user (step 3 reads it from the token)
    "stream_server": "/stream",
    "stream_server_multiuser": "/stream/{user}",
    "stream_server_multiuser_secure": "/stream",
}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn does not run on Windows")


class Gunicorn:
    """One gunicorn server in a subprocess on a free loopback port; stopped by its own PID."""

    def __init__(self, module: str, worker: str) -> None:
        self.module = module
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", worker]
        command += ["-w", "1", "--threads", "8", "-b", "127.0.0.1:0", f"{module}:app"]
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

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture(scope="module", params=["gthread", "gevent"])
def worker(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=list(STEPS))
def server(request, worker):
    server = Gunicorn(request.param, worker)
    yield server
    server.stop()


def auth_headers(server: Gunicorn, user: str) -> dict:
    if server.module != "stream_server_multiuser_secure":
        return {}
    return bearer(token_for(user))


def open_stream(server: Gunicorn, query: str, user: str):
    path = STEPS[server.module].format(user=user)
    lines = [f"{name}: {value}" for name, value in auth_headers(server, user).items()]
    sock, wire = show_chunks.send_request(f"{server.url}{path}?{query}", lines)
    sock.settimeout(WAIT)
    return sock, wire


def status(server: Gunicorn) -> dict:
    headers = auth_headers(server, user="Observer")
    return requests.get(f"{server.url}/status", headers=headers, timeout=WAIT).json()


def test_the_stream_is_chunked_on_the_wire(server):
    sock, wire = open_stream(server, "count=3&interval=0", user="Alice")
    with sock, wire:
        head = show_chunks.read_head(wire)
        assert head[0] == "HTTP/1.1 200 OK"
        assert "Transfer-Encoding: chunked" in head
        payloads = [payload.decode() for _, payload in show_chunks.read_chunks(wire)]
    suffix = "\n" if server.module == "stream_server" else " for Alice\n"
    assert payloads == [f"chunk {n} of 3{suffix}" for n in (1, 2, 3)] + [""]


def test_the_first_chunk_arrives_long_before_the_last_is_made(server):
    # The last chunk is 60 s away; the first must be here well within WAIT seconds.
    sock, wire = open_stream(server, "count=2&interval=60", user="Patient")
    with sock, wire:
        show_chunks.read_head(wire)
        size_line, payload = next(show_chunks.read_chunks(wire))
        assert payload.startswith(b"chunk 1 of 2")
        assert int(size_line, 16) == len(payload)


def test_a_client_that_hangs_up_is_freed(server):
    tracked = server.module != "stream_server"  # steps 2 and 3 have /status
    sock, wire = open_stream(server, "count=100000&interval=0.02", user="Leaver")
    with sock, wire:
        show_chunks.read_head(wire)
        next(show_chunks.read_chunks(wire))
        if tracked:
            assert status(server)["active"].get("Leaver") == 1
    # The server notices on one of its next writes, closes the generator, and logs it.
    server.wait_for_line(r"disconnected after \d+ of 100000 chunks")
    if tracked:
        wait_until(lambda: "Leaver" not in status(server)["active"])


only_step_3 = pytest.mark.parametrize("server", ["stream_server_multiuser_secure"], indirect=True)


@only_step_3
def test_the_secure_step_refuses_without_a_valid_token(server):
    missing = requests.get(f"{server.url}/stream", timeout=WAIT)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="streams"'
    forged = requests.get(f"{server.url}/stream", headers=bearer("a.b.c"), timeout=WAIT)
    assert forged.status_code == 401
    assert 'error="invalid_token"' in forged.headers["WWW-Authenticate"]
    assert "chunk" not in forged.text


@only_step_3
def test_tokens_are_signed_with_the_shared_secret(server):
    minted = requests.post(f"{server.url}/generate_token", json={"user_id": "Bob"}, timeout=WAIT)
    claims = jwt.decode(minted.json()["access_token"], TEST_KEY, algorithms=["HS256"])
    assert claims["sub"] == "Bob"  # signed with JWT_SECRET_KEY, not a per-process random key


@pytest.mark.parametrize("key", [None, "too short"], ids=["unset", "short"])
def test_a_missing_or_short_key_stops_gunicorn_once(key):
    # Before, a worker that refused the key exited and gunicorn started another, forever.
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET_KEY"}
    if key is not None:
        env["JWT_SECRET_KEY"] = key
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
    command += ["stream_server_multiuser_secure:app"]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "JWT_SECRET_KEY must be set, at least 32 bytes" in output
    assert output.count("JWT_SECRET_KEY must be set") == 1
    assert "Booting worker" not in output  # stopped before any worker, never restarted
    assert "Traceback" not in output


# gunicorn: Ctrl-C, the access log, --pythonpath


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_ctrl_c_stops_gunicorn_at_once_and_quietly_with_a_stream_open(worker_class):
    server = Gunicorn("stream_server_multiuser", worker_class)
    try:
        worker_pid = int(server.wait_for_line(r"Booting worker with pid: (\d+)").group(1))
        sock, wire = open_stream(server, "count=1000&interval=1", user="Watcher")
        with sock, wire:
            show_chunks.read_head(wire)
            next(show_chunks.read_chunks(wire))  # the stream is open, with 999 chunks to go
            # Ctrl-C: the terminal sends SIGINT to its whole foreground process group.
            for pid in (server.process.pid, worker_pid):
                os.kill(pid, signal.SIGINT)
            server.process.wait(WAIT)
        server.wait_for_line(r"Shutting down: Master")
        output = "".join(server.log)
        # Before: gthread waited for the stream until the master killed the worker ("was
        # sent SIGKILL! Perhaps out of memory?"); gevent printed a SystemExit traceback.
        assert "SIGKILL" not in output
        assert "Traceback" not in output
        assert "open streams are cut" in output
    finally:
        server.stop()


def test_a_crafted_basic_auth_header_cannot_forge_access_log_lines():
    server = Gunicorn("stream_server", "gthread")
    try:
        forged = 'Mallory - - [01/Jan/2030:00:00:00 +0000] "GET /admin HTTP/1.1" 200 2\n'
        forged += "1.2.3.4 \x1b[2J"  # a new line, and an escape sequence: clear the screen
        credentials = base64.b64encode(f"{forged}:password".encode()).decode()
        # And control characters above 127 (Latin-1's NEL and CSI), which gunicorn lets
        # through in header values, in the two headers of its default format.
        headers = {
            "Authorization": f"Basic {credentials}",
            "User-Agent": "a\x9b2J",
            "Referer": "b\x85",
        }
        response = requests.get(f"{server.url}/?crafted", headers=headers, timeout=WAIT)
        assert response.status_code == 200, response.text
        line = server.wait_for_line(r'"GET /\?crafted HTTP/1\.1"').string
        # gunicorn's prefix, then the Common Log Format: all of it on this one line.
        prefix = r"\[[^]]+\] \[\d+\] \[INFO\] "
        access = prefix + r'127\.0\.0\.1 - - \[[^]]+\] "GET /\?crafted HTTP/1\.1" 200 \d+\n'
        assert re.fullmatch(access, line), line
        log = "".join(server.log)
        assert "Mallory" not in log
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", log), repr(log)
    finally:
        server.stop()


def test_the_key_check_finds_an_app_on_gunicorns_pythonpath():
    # The benchmark serves its bare WSGI reference with --pythonpath bench. gunicorn.conf.py
    # imports the app for its key check too, and used to look in the current folder only:
    # gunicorn stopped at once.
    server = bench.Server(bench.SERVERS["gunicorn gevent, bare WSGI (reference)"], "unused")
    try:
        assert bench.fast_read(server.port, "/stream/Ref?count=3&interval=0") > 0
    finally:
        server.stop()
