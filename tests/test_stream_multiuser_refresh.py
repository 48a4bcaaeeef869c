"""Step 6: stream_server_multiuser_refresh.py and its client; HTTPS for steps 3 and 6."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests

import stream_client_multiuser_refresh as refresh_client
import stream_client_multiuser_secure as secure_client
import stream_server_multiuser_refresh as server
import stream_server_multiuser_secure as secure_server
from helpers import TEST_KEY, WAIT, bearer, token_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def test_key_and_fresh_ledger(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setitem(secure_server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setattr(server, "ledger", server.RefreshTokenLedger())


@pytest.fixture
def client():
    return server.app.test_client()


def pair(client, user="Alice") -> dict:
    return client.post("/generate_token", json={"user_id": user}).json


def refresh(client, token: str):
    return client.post("/refresh_token", json={"refresh_token": token})


def assert_refused(response, description: str) -> None:
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="streams", error="invalid_token", error_description="{description}"'
    )
    assert response.json == {"error": "invalid_token", "error_description": description}


def lines(response) -> list[dict]:
    return [json.loads(text) for text in response.text.splitlines()]


# Tokens


def test_minting_returns_an_access_and_a_refresh_token(client):
    response = client.post("/generate_token", json={"user_id": "Alice"})
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert (body["token_type"], body["expires_in"], body["refresh_expires_in"]) == (
        "Bearer",
        60,
        3600,
    )
    access = jwt.decode(body["access_token"], TEST_KEY, algorithms=["HS256"])
    refresh_claims = jwt.decode(body["refresh_token"], TEST_KEY, algorithms=["HS256"])
    assert (access["use"], access["sub"], access["exp"] - access["iat"]) == ("access", "Alice", 60)
    assert (refresh_claims["use"], refresh_claims["exp"] - refresh_claims["iat"]) == (
        "refresh",
        3600,
    )
    assert len(refresh_claims["jti"]) == 32


def test_a_refresh_token_buys_a_new_pair_once(client):
    first = pair(client)
    second = refresh(client, first["refresh_token"])
    assert second.status_code == 200
    assert second.json["refresh_token"] != first["refresh_token"]
    assert_refused(refresh(client, first["refresh_token"]), "this refresh token was already used")
    assert refresh(client, second.json["refresh_token"]).status_code == 200


def test_an_access_token_cannot_be_refreshed(client):
    assert_refused(
        refresh(client, pair(client)["access_token"]), "only a refresh token can be refreshed"
    )


def test_a_refresh_token_cannot_open_a_stream(client):
    response = client.get("/stream", headers=bearer(pair(client)["refresh_token"]))
    assert_refused(response, "a refresh token cannot open a stream: refresh it for an access token")
    assert "chunk" not in response.text


def test_an_expired_refresh_token_is_refused(client):
    expired = token_for(use="refresh", jti="x" * 32, iat=1, exp=2)
    assert_refused(refresh(client, expired), "the token has expired")


@pytest.mark.parametrize(
    "token",
    [
        token_for(use="refresh"),  # no jti
        token_for(use="refresh", jti="j", key=b"a key of at least thirty-two bytes"),
        token_for(jti="j"),  # no use
    ],
)
def test_forged_or_incomplete_refresh_tokens_are_refused(client, token):
    response = refresh(client, token)
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token"


@pytest.mark.parametrize(
    "kwargs", [{"json": {}}, {"json": {"refresh_token": 5}}, {"data": "refresh_token=x"}]
)
def test_a_bad_refresh_request_gets_400(client, kwargs):
    response = client.post("/refresh_token", **kwargs)
    assert response.status_code == 400
    assert (
        response.json["error"]
        == 'send a JSON object with a string "refresh_token", as application/json'
    )


# Streaming


@pytest.fixture
def clock(monkeypatch):
    """The server's clock, moved on only by its own sleeps: expiry without waiting for it."""

    class Clock:
        now = time.time()

        def time(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    fake = Clock()
    monkeypatch.setattr(server, "time", fake.time)
    monkeypatch.setattr(server, "sleep", fake.sleep)
    return fake


def test_every_line_is_json_with_its_sequence_number(client, clock):
    response = client.get(
        "/stream?count=3&interval=1", headers=bearer(pair(client)["access_token"])
    )
    assert response.mimetype == "application/x-ndjson"
    assert lines(response) == [
        {"seq": 1, "text": "chunk 1 of 3 for Alice"},
        {"seq": 2, "text": "chunk 2 of 3 for Alice"},
        {"seq": 3, "text": "chunk 3 of 3 for Alice"},
        {"end": "complete"},
    ]


def test_from_resumes_at_that_line(client, clock):
    token = pair(client)["access_token"]
    response = client.get("/stream?count=5&interval=1&from=4", headers=bearer(token))
    assert [line.get("seq") for line in lines(response)] == [4, 5, None]
    assert client.get("/stream?from=0", headers=bearer(token)).status_code == 400


def test_a_stream_stops_the_moment_its_token_expires(client, clock):
    token = pair(client)["access_token"]
    expires = jwt.decode(token, TEST_KEY, algorithms=["HS256"])["exp"]
    started = clock.now
    received = lines(client.get("/stream?count=100&interval=7", headers=bearer(token)))
    sent = [line["seq"] for line in received[:-1]]
    assert sent == list(range(1, len(sent) + 1))
    assert received[-1] == {"end": "token_expired", "next": len(sent) + 1}
    assert clock.now == expires  # it woke at the expiry, and sent nothing after it
    assert started + 7 * (len(sent) - 1) < expires <= started + 7 * len(sent)


def test_the_client_gets_every_line_once_across_refreshes_and_a_drop(
    serve, drop_connection, monkeypatch, capsys
):
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 1)
    drop_connection(at_pause=5, real_sleep=True)
    argv = ["--url", serve(server.app), "--user", "Bob", "--count", "30", "--interval", "0.1"]
    assert refresh_client.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    received = [line.split("  ", 1)[1] for line in out if line.startswith("+")]
    assert received == [f"chunk {n} of 30 for Bob" for n in range(1, 31)]
    notes = [line for line in out if line.startswith("(")]
    # 3 s of stream with 1-second tokens: at least two expiries, plus the dropped connection.
    assert sum("the access token expired" in note for note in notes) >= 2
    assert sum("the connection was lost" in note for note in notes) == 1
    assert out[-1].startswith("done: all 30 lines in ")


def test_the_client_gives_up_when_the_refresh_is_refused(serve, monkeypatch, capsys):
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 1)
    monkeypatch.setitem(server.app.config, "REFRESH_LIFETIME", 1)
    argv = ["--url", serve(server.app), "--count", "50", "--interval", "0.1"]
    assert refresh_client.main(argv) == 1
    assert capsys.readouterr().err.endswith("/refresh_token answered 401: the token has expired\n")


# HTTPS


STEPS_WITH_HTTPS = pytest.mark.parametrize(
    ("step_server", "step_client"),
    [(secure_server, secure_client), (server, refresh_client)],
    ids=["step 3", "step 6"],
)


@STEPS_WITH_HTTPS
def test_streams_over_https_with_the_ca_trusted(serve, tls, capsys, step_server, step_client):
    url = serve(step_server.app, tls.server_context)
    argv = ["--url", url, "--count", "2", "--interval", "0", "--cacert", tls.ca_file]
    assert step_client.main(argv) == 0
    assert "chunk 2 of 2 for User1" in capsys.readouterr().out


@STEPS_WITH_HTTPS
def test_a_client_that_does_not_trust_the_ca_says_so(serve, tls, capsys, step_server, step_client):
    url = serve(step_server.app, tls.server_context)
    assert step_client.main(["--url", url, "--count", "1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot verify the certificate of {url}/generate_token")
    assert error.count("\n") == 1


@pytest.mark.parametrize(
    "module", ["stream_server_multiuser_secure", "stream_server_multiuser_refresh"]
)
def test_the_servers_serve_https_only_with_cert_and_key(tls, module):
    # Port 0: the OS picks a free port, and the dev server logs the one it got.
    command = [sys.executable, f"{module}.py", "--port", "0"]
    command += ["--cert", tls.cert_file, "--key", tls.key_file]
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = logged_https_port(process)
        minted = requests.post(
            f"https://127.0.0.1:{port}/generate_token",
            json={"user_id": "Al"},
            verify=tls.ca_file,
            timeout=WAIT,
        )
        assert minted.status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.post(
                f"http://127.0.0.1:{port}/generate_token", json={"user_id": "Al"}, timeout=WAIT
            )
    finally:
        process.terminate()
        process.wait(WAIT)
        process.stderr.close()


def logged_https_port(process: subprocess.Popen) -> int:
    """The port in the dev server's "Running on https://..." line (it is listening by then)."""
    for line in process.stderr:
        if match := re.search(r"Running on https://127\.0\.0\.1:(\d+)", line):
            return int(match.group(1))
    raise AssertionError("the server exited without saying where it serves HTTPS")


def test_a_missing_certificate_stops_the_server_with_a_clear_message(tmp_path):
    command = [
        sys.executable,
        "stream_server_multiuser_refresh.py",
        "--cert",
        str(tmp_path / "no.pem"),
        "--key",
        str(tmp_path / "no.key"),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()},
    )
    assert result.returncode == 2
    assert "cannot use --cert" in result.stderr
    assert "Traceback" not in result.stderr
