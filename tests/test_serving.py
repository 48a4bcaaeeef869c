"""Every step's app, unchanged, under gunicorn's gthread and gevent workers, checked on the wire."""

import os
import subprocess
import sys

import jwt
import pytest
import requests

import show_chunks
from helpers import ROOT, TEST_KEY, WAIT, bearer, token_for, wait_until
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


def test_an_app_found_through_pythonpath_starts():
    # The key check in gunicorn.conf.py imports the app in a separate interpreter: it must
    # look where gunicorn looks, --pythonpath included (the benchmark serves bench/wsgi_app).
    server = Gunicorn("wsgi_app", "gevent", extra=["--pythonpath", "bench"])
    try:
        assert requests.get(f"{server.url}/stream/Al?count=1", timeout=WAIT).status_code == 200
    finally:
        server.stop()
