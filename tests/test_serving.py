"""How the steps are served, checked on the wire: every step's app, unchanged, under
gunicorn's gthread and gevent workers; and Werkzeug's dev server as each step's __main__
starts it, with its time limits and HTTPS."""

import base64
import contextlib
import logging
import os
import re
import runpy
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import jwt
import pytest
import requests
from flask import Flask, request

import serving
import show_chunks
import stream_server_multiuser as multiuser
import stream_server_multiuser_refresh as refresh
import stream_server_multiuser_resume as resume
import stream_server_multiuser_secure as secure
from helpers import ROOT, TEST_KEY, WAIT, bearer, https_step, port_of, token_for, wait_until
from services import Gunicorn

STEPS = {  # module: stream path, where {user} names the user (step 3 reads it from the token)
    "stream_server": "/stream",
    "stream_server_multiuser": "/stream/{user}",
    "stream_server_multiuser_secure": "/stream",
}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn does not run on Windows")


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
    assert "JWT_SECRET_KEY must be set to a key of 32 bytes or more (for HS256)" in output
    assert output.count("JWT_SECRET_KEY must be set") == 1
    assert "Booting worker" not in output  # stopped before any worker, never restarted
    assert "Traceback" not in output


def test_an_app_found_through_pythonpath_starts(gunicorn):
    # The key check in gunicorn.conf.py imports the app in a separate interpreter: it must
    # look where gunicorn looks, --pythonpath included (the benchmark serves bench/wsgi_app).
    server = gunicorn("wsgi_app", "gevent", extra=["--pythonpath", "bench"])
    assert requests.get(f"{server.url}/stream/Al?count=1", timeout=WAIT).status_code == 200


def stream_status(base_url: str, headers: dict | None = None) -> dict:
    return requests.get(f"{base_url}/status", headers=headers, timeout=WAIT).json()


@contextlib.contextmanager
def stalled_client(base_url: str, path: str, headers: dict | None = None):
    """A client that sends its request, then never reads: with its receive buffer kept
    small, the server's writes soon wait. It stays connected until the block ends."""
    parts = urlsplit(base_url)
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect, or no use
        sock.connect((parts.hostname, parts.port))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        yield


def started_and_ended(status: dict) -> bool:
    """One stream was served, and it is no longer active."""
    return status["served"] == 1 and status["active"] == {}


# gunicorn: write timeout, fairness under gevent, Ctrl-C, the access log


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_gunicorn_ends_a_stream_whose_client_stops_reading(worker_class, monkeypatch, gunicorn):
    monkeypatch.setenv("WRITE_TIMEOUT", "0.5")  # gunicorn.conf.py reads it; 90 s by default
    server = gunicorn("stream_server_multiuser", worker_class)
    with stalled_client(server.url, "/stream/Staller?count=1000000&interval=0"):
        # Ended while its client is still connected: a write timed out. Before, the
        # stream stayed active for as long as the client did.
        wait_until(lambda: started_and_ended(stream_status(server.url)))
        server.wait_for_line(r"Staller disconnected after \d+ of 1000000 chunks")
        server.wait_for_line(r"closed a connection whose client accepted no data for 0\.5 s")
    assert "Traceback" not in "".join(server.log)


def read_as_fast_as_they_come(socks: list, flowing: list, stop: threading.Event) -> None:
    """Read every socket in `socks` until `stop`; set flowing[n] once socks[n] has data."""
    with selectors.DefaultSelector() as selector:
        for number, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, number)
        while not stop.is_set() and selector.get_map():
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(1 << 16)
                except ConnectionError:
                    data = b""
                if data:
                    flowing[key.data].set()
                else:
                    selector.unregister(key.fileobj)


@pytest.mark.parametrize("module", list(STEPS))
def test_under_gevent_streams_at_interval_0_let_other_clients_in(module, gunicorn):
    # Four streams that never pause, each read as fast as it comes, so that their writes
    # never wait either. Before, the first of them kept the worker to itself: the others
    # did not begin, and no other client was answered, until it ended.
    server = gunicorn(module, "gevent")
    fast, flowing, stop = [], [threading.Event() for _ in range(4)], threading.Event()
    reader = threading.Thread(target=read_as_fast_as_they_come, args=(fast, flowing, stop))
    try:
        for number in range(4):
            sock, wire = open_stream(server, "count=1000000&interval=0", user=f"Fast{number}")
            wire.close()  # unread: the reader reads the socket itself
            fast.append(sock)
        reader.start()
        for number, began in enumerate(flowing):
            assert began.wait(WAIT), f"fast stream {number} never began"
        sock, wire = open_stream(server, "count=1", user="Other")
        with sock, wire:
            assert show_chunks.read_head(wire)[0] == "HTTP/1.1 200 OK"
            _, payload = next(show_chunks.read_chunks(wire))
        assert payload.startswith(b"chunk 1 of 1")
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        for sock in fast:
            sock.close()


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_ctrl_c_stops_gunicorn_at_once_and_quietly_with_a_stream_open(worker_class, gunicorn):
    server = gunicorn("stream_server_multiuser", worker_class)
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


@pytest.mark.parametrize("worker_class", ["gthread", "gevent"])
def test_ctrl_c_stops_gunicorn_at_once_while_a_worker_starts(worker_class, gunicorn):
    # A worker sets its own signal handlers only once it has started (a gevent worker after
    # patching the standard library). Before, it had the master's until then, which queued
    # a signal where no one read it: a Ctrl-C in that moment was lost, and the master killed
    # the worker after graceful_timeout. SIGTTIN makes gunicorn start one more worker, so
    # each round signals into that moment; under gevent, every round was lost.
    for _ in range(3):
        server = gunicorn("stream_server_multiuser", worker_class)
        server.wait_for_line(r"Booting worker with pid: (\d+)")
        sock, wire = open_stream(server, "count=1000&interval=1", user="Watcher")
        with sock, wire:
            show_chunks.read_head(wire)
            next(show_chunks.read_chunks(wire))  # the stream is open, with 999 chunks to go
            os.kill(server.process.pid, signal.SIGTTIN)
            server.wait_for_line(r"Booting worker with pid: (\d+)")
            os.killpg(server.process.pid, signal.SIGINT)  # Ctrl-C: the whole process group
            server.process.wait(WAIT)
        server.wait_for_line(r"Shutting down: Master")
        output = "".join(server.log)
        assert "was sent" not in output, output  # SIGKILL, or any other signal
        assert "Traceback" not in output, output


def test_a_crafted_basic_auth_header_cannot_forge_access_log_lines(gunicorn):
    server = gunicorn("stream_server", "gthread")
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


# Werkzeug's dev server, as each step's __main__ starts it

DEV_STEPS = [
    "stream_server",
    "stream_server_chat",
    "stream_server_multiuser",
    "stream_server_multiuser_secure",
    "stream_server_sse",
    "stream_server_websocket",
    "stream_server_multiuser_refresh",
    "stream_server_multiuser_resume",
]
TLS_STEPS = {
    "stream_server_multiuser_secure": secure,
    "stream_server_multiuser_refresh": refresh,
    "stream_server_multiuser_resume": resume,
}


@pytest.fixture
def dev_server(serve, monkeypatch):
    """Serve a step's app in this process as its __main__ does: Werkzeug's threaded server
    with the step's RequestHandler, and HTTPS with the step's tls_context if given certs."""

    def start(step, tls=None) -> str:
        monkeypatch.setitem(step.app.config, "JWT_SECRET_KEY", TEST_KEY)
        context = step.tls_context(tls.cert_file, tls.key_file) if tls else None
        return serve(step.app, context, step.RequestHandler)

    return start


@pytest.mark.parametrize("module", DEV_STEPS)
def test_each_step_serves_with_its_request_handler(module, monkeypatch, tls):
    runs = []
    monkeypatch.setattr(Flask, "run", lambda app, **options: runs.append(options))
    https = ["--cert", tls.cert_file, "--key", tls.key_file] if module in TLS_STEPS else []
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *https])
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_KEY.decode())
    monkeypatch.delenv("REDIS_URL", raising=False)  # the chat's rooms in this process
    runpy.run_path(str(ROOT / f"{module}.py"), run_name="__main__")
    [options] = runs
    assert options["threaded"] is True
    handler = options["request_handler"]
    assert handler.__qualname__ == "RequestHandler"
    assert handler.timeout == 5  # REQUEST_TIMEOUT


@pytest.mark.parametrize("timer", ["TCP_USER_TIMEOUT", "settimeout"])
def test_the_dev_server_ends_a_stream_whose_client_stops_reading(
    timer, dev_server, monkeypatch, caplog
):
    if timer == "settimeout":  # as on systems without TCP_USER_TIMEOUT (macOS, Windows)
        monkeypatch.delattr(socket, "TCP_USER_TIMEOUT", raising=False)
    monkeypatch.setattr(serving, "WRITE_TIMEOUT", 0.5)  # 90 s by default
    # Far beyond WAIT: only the write timeout can end the stream in time. (With the request
    # timeout's 5 s, a stream whose write timeout was never set still ended, only later.)
    monkeypatch.setattr(multiuser.RequestHandler, "timeout", 600)
    monkeypatch.setattr(multiuser, "tracker", multiuser.StreamTracker())  # nothing served yet
    caplog.set_level(logging.INFO, logger=multiuser.__name__)
    url = dev_server(multiuser)
    with stalled_client(url, "/stream/Staller?count=1000000&interval=0"):
        # Ended while its client is still connected: a write timed out. Before, the stream
        # stayed active, its thread blocked in a write, for as long as the client did.
        wait_until(lambda: started_and_ended(stream_status(url)))
    assert re.search(r"Staller disconnected after \d+ of 1000000 chunks", caplog.text)


@pytest.mark.parametrize("timer", ["TCP_USER_TIMEOUT", "settimeout"])
def test_once_the_request_is_in_only_the_write_timeout_holds(timer, serve, monkeypatch):
    # What a slow reader meets while the answer is written: the write timeout, 90 s, and
    # nothing left of the request's. Before, a socket left with the request timeout cut
    # off a client that paused reading for longer than that.
    if timer == "settimeout":  # as on systems without TCP_USER_TIMEOUT (macOS, Windows)
        monkeypatch.delattr(socket, "TCP_USER_TIMEOUT", raising=False)
    app = Flask(__name__)

    @app.get("/")
    def timeouts():
        """The connection's timeouts, as the answer is written."""
        sock = request.environ["werkzeug.socket"]
        linux = sys.platform == "linux"  # where TCP_USER_TIMEOUT is option 18, set or not
        kernel = sock.getsockopt(socket.IPPROTO_TCP, 18) if linux else 0
        return {"python": sock.gettimeout(), "kernel": kernel}

    answer = requests.get(serve(app, request_handler=serving.RequestHandler), timeout=WAIT)
    if timer == "settimeout" or sys.platform != "linux":
        assert answer.json() == {"python": serving.WRITE_TIMEOUT, "kernel": 0}
    else:
        assert answer.json() == {"python": None, "kernel": serving.WRITE_TIMEOUT * 1000}


@pytest.mark.parametrize("module", list(TLS_STEPS))
def test_an_idle_connection_does_not_hold_up_https(module, tls):
    with https_step(f"{module}.py", tls) as url:
        port = port_of(url)
        # Connected, and silent: no TLS handshake. Before, the server waited for it in the
        # one thread that accepts every connection, and served no one else meanwhile.
        with socket.create_connection(("127.0.0.1", port)):
            # A client that checks the server's certificate against the test CA.
            checked = {"verify": tls.ca_file, "timeout": WAIT}
            minted = requests.post(f"{url}/generate_token", json={"user_id": "Al"}, **checked)
            assert minted.status_code == 200, minted.text
            headers = bearer(minted.json()["access_token"])
            with requests.get(
                f"{url}/stream?count=2&interval=0", headers=headers, stream=True, **checked
            ) as response:
                assert response.status_code == 200, response.text
                lines = list(response.iter_lines())
        assert b"chunk 2 of 2 for Al" in lines[1]


@pytest.mark.parametrize("step", list(TLS_STEPS.values()), ids=list(TLS_STEPS))
def test_a_tls_handshake_that_never_comes_is_dropped(step, tls, dev_server, monkeypatch):
    monkeypatch.setattr(step.RequestHandler, "timeout", 0.2)  # REQUEST_TIMEOUT, 5 s in the step
    url = dev_server(step, tls)
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT) as idle:
        # The server closes the connection (b""); before, recv() waited on for WAIT seconds.
        assert idle.recv(1) == b""
    minted = requests.post(
        f"{url}/generate_token", json={"user_id": "Al"}, verify=tls.ca_file, timeout=WAIT
    )
    assert minted.status_code == 200, minted.text


def trickled_until_cut(sock: socket.socket, head: bytes, every: float) -> int:
    """Send `head` one byte every `every` seconds while the server keeps the connection
    open; give how many bytes went before it closed it (all of them if it never did)."""
    sock.settimeout(every)  # each wait for the server's end is the pause between two bytes
    for sent in range(len(head)):
        try:
            sock.sendall(head[sent : sent + 1])
            if not sock.recv(1024):
                return sent + 1
        except TimeoutError:  # still open (over TLS, a session ticket may have come)
            continue
        except OSError:  # reset, or a broken pipe: closed as well
            return sent + 1
    return len(head)


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_request_head_sent_a_byte_at_a_time_gets_one_deadline(
    https, tls, dev_server, monkeypatch
):
    # One byte every 0.05 s never leaves the connection silent for the 0.3 s timeout. Before,
    # the timeout was on each read, so such a client held its thread for as long as it liked;
    # now the whole head must be in within the timeout, as under gunicorn and nginx.
    monkeypatch.setattr(secure.RequestHandler, "timeout", 0.3)  # REQUEST_TIMEOUT, 5 s
    url = dev_server(secure, tls if https else None)
    head = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"." * 60 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT) as raw:
        if https:  # the handshake at full speed; then each byte of the head in a record
            client = ssl.create_default_context(cafile=tls.ca_file)
            sock = client.wrap_socket(raw, server_hostname="127.0.0.1")
        else:
            sock = raw
        with sock:
            sent = trickled_until_cut(sock, head, every=0.05)
    assert sent < len(head), "the server waited for the whole head"
    minted = requests.post(  # and the server serves on
        f"{url}/generate_token", json={"user_id": "Al"}, verify=tls.ca_file, timeout=WAIT
    )
    assert minted.status_code == 200, minted.text


def test_past_the_deadline_no_read_waits_even_for_bytes_already_there():
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        reader = serving.HeadReader(server_end, -1)  # its deadline has passed
        client_end.sendall(b"GET / HTTP/1.1\r\n")  # a byte that came just in time: too late
        with pytest.raises(TimeoutError) as raised:
            reader.readinto(bytearray(64))
    assert str(raised.value) == "the request head took too long"


def test_tls_context_wants_both_files_or_neither(tls, tmp_path):
    assert serving.tls_context(None, None) is None  # plain HTTP
    assert serving.tls_context(tls.cert_file, tls.key_file) is not None
    for cert, key in [(tls.cert_file, None), (None, tls.key_file)]:
        with pytest.raises(ValueError) as raised:
            serving.tls_context(cert, key)
        assert str(raised.value) == "--cert and --key go together"
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError) as raised:
        serving.tls_context(missing, tls.key_file)
    assert str(raised.value).startswith(f"cannot use --cert {missing} --key {tls.key_file}: ")
