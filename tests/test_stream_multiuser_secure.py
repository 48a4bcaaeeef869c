"""Step 3: stream_server_multiuser_secure.py and stream_client_multiuser_secure.py."""

import base64
import json
import logging
import os
import time
from datetime import datetime, timezone

import jwt
import pytest
import requests
from flask import Flask, Response

import show_chunks
import stream_client_multiuser_secure as secure_client
import stream_server
import stream_server_multiuser_refresh as refresh_server
import stream_server_multiuser_resume as resume_server
import stream_server_multiuser_secure as server
import tokens
from helpers import (
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    https_step,
    only_help,
    token_for,
)

OTHER_KEY = b"some other signing key " * 4
CHALLENGE = 'Bearer realm="streams"'

PID = os.getpid()  # the tests' own process runs the servers


@pytest.fixture(autouse=True)
def test_key_and_fresh_tracker(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setattr(server, "tracker", server.StreamTracker())
    monkeypatch.setattr(server, "sleep", lambda seconds: None)


@pytest.fixture
def client():
    return server.app.test_client()


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def mint(client, **kwargs):
    return client.post("/generate_token", **kwargs)


# Minting


def test_the_seeds_mint_request_returns_a_bearer_token(client):
    response = mint(client, json={"user_id": "User1"})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 15 * 60
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, TEST_KEY, algorithms=["HS256"])
    assert set(claims) == {"sub", "iat", "exp"}
    assert claims["sub"] == "User1"
    assert claims["exp"] - claims["iat"] == 15 * 60


def test_token_lifetime_is_configurable(client, monkeypatch):
    monkeypatch.setitem(server.app.config, "TOKEN_LIFETIME", 30)
    body = mint(client, json={"user_id": "User1"}).json
    claims = jwt.decode(body["access_token"], TEST_KEY, algorithms=["HS256"])
    assert body["expires_in"] == claims["exp"] - claims["iat"] == 30


USER_ID_RULE = "user_id must be a string of 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots"
NOT_AN_OBJECT = 'the body must be a JSON object such as {"user_id": "User1"}'
NOT_JSON = "send the body as JSON, with Content-Type: application/json"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error"),
    [
        ({"data": "user_id=User1"}, 415, NOT_JSON),
        ({"data": "{not json", "content_type": "application/json"}, 400, NOT_AN_OBJECT),
        ({"json": ["User1"]}, 400, NOT_AN_OBJECT),
        ({"json": "User1"}, 400, NOT_AN_OBJECT),
        ({"data": "null", "content_type": "application/json"}, 400, NOT_AN_OBJECT),
        ({"json": {}}, 400, "user_id is missing"),
        ({"json": {"user": "User1"}}, 400, "user_id is missing"),
        ({"json": {"user_id": 42}}, 400, USER_ID_RULE),
        ({"json": {"user_id": ["User1"]}}, 400, USER_ID_RULE),
        ({"json": {"user_id": ""}}, 400, USER_ID_RULE),
        ({"json": {"user_id": "U" * 65}}, 400, USER_ID_RULE),
        ({"json": {"user_id": "bad user"}}, 400, USER_ID_RULE),
        ({"json": {"user_id": "x" * 2000}}, 413, "exceeds the capacity limit"),
        ({"json": {"user_id": ".."}}, 400, USER_ID_RULE),
        # Deeper than Python's json parser goes: a RecursionError, not a 500.
        ({"data": "[" * 1000, "content_type": "application/json"}, 400, NOT_AN_OBJECT),
    ],
)
def test_bad_mint_requests_get_clear_json_errors(client, request_kwargs, status, error):
    response = mint(client, **request_kwargs)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    if status == 413:  # Werkzeug's own words
        assert error in response.json["error"]
    else:  # word for word: the one line a client shows
        assert response.json["error"] == error
    assert "access_token" not in response.text


def test_minting_needs_post(client):
    response = client.get("/generate_token")
    assert response.status_code == 405
    assert response.json["error"]


def test_an_unset_secret_means_a_random_key_and_one_warning(monkeypatch, caplog):
    monkeypatch.delenv("JWT_SECRET_KEY", raising=False)
    first, second = server.load_secret_key(), server.load_secret_key()
    assert len(first) == 32
    assert first != second
    warning = "JWT_SECRET_KEY is unset: tokens will not survive a restart"
    assert [record.getMessage() for record in caplog.records] == [warning, warning]


def test_a_short_secret_stops_the_server(monkeypatch):
    monkeypatch.setenv("JWT_SECRET_KEY", "x" * 31)
    with pytest.raises(SystemExit) as raised:
        server.load_secret_key()
    short = "JWT_SECRET_KEY must be set to a key of 32 bytes or more (for HS256)"
    assert str(raised.value) == short
    monkeypatch.setenv("JWT_SECRET_KEY", "x" * 32)  # 256 bits: enough
    assert server.load_secret_key() == b"x" * 32


def test_a_required_secret_must_be_set(monkeypatch):
    monkeypatch.delenv("JWT_SECRET_KEY", raising=False)
    with pytest.raises(SystemExit, match="must be set"):
        server.load_secret_key(required=True)


def test_help_prints_only_the_help():
    # Nothing happens at import: no warning about the key before the reader asked for help.
    assert only_help("stream_server_multiuser_secure.py")


def test_the_secret_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JWT_SECRET_KEY", TEST_KEY.decode())
    assert server.load_secret_key() == TEST_KEY


# Streaming with a token


class FrozenClock(datetime):
    """PyJWT's clock (datetime.now), stopped at FROZEN, so that a test can stand at a boundary."""

    @classmethod
    def now(cls, tz=None):
        return datetime.fromtimestamp(FROZEN, tz)


FROZEN = 2_000_000_000


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"iat": FROZEN + tokens.CLOCK_LEEWAY}, None),  # minted on a host whose clock is ahead
        ({"iat": FROZEN + tokens.CLOCK_LEEWAY + 1}, "the token is not valid yet"),
        ({"exp": FROZEN - tokens.CLOCK_LEEWAY + 1}, None),  # checked on a host whose clock is ahead
        ({"exp": FROZEN - tokens.CLOCK_LEEWAY}, "the token has expired"),
    ],
    ids=["iat ahead by the leeway", "iat beyond it", "exp by the leeway", "exp beyond it"],
)
def test_a_token_from_a_clock_slightly_ahead_is_accepted(client, monkeypatch, claims, problem):
    # Any host may check any host's tokens: CLOCK_LEEWAY seconds of clock difference, and
    # not one more, are no reason to refuse.
    assert tokens.CLOCK_LEEWAY == 10
    monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenClock)
    claims = {"iat": FROZEN, "exp": FROZEN + 60, **claims}
    response = client.get("/stream?count=1", headers=bearer(token_for(**claims)))
    if problem is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 401
        assert response.json["error_description"] == problem


def exactly(length: int) -> str:
    """A valid access token of exactly `length` characters: a claim pads it."""
    for pad in range(length):
        token = token_for(padding="x" * pad)
        if len(token) == length:
            return token
    raise AssertionError(f"no padding gives a token of {length} characters")


def test_a_token_of_the_longest_length_is_taken_and_one_more_character_refused(client):
    longest = exactly(tokens.MAX_TOKEN_LENGTH)
    assert client.get("/stream?count=1", headers=bearer(longest)).status_code == 200
    over = exactly(tokens.MAX_TOKEN_LENGTH + 1)
    response = client.get("/stream?count=1", headers=bearer(over))
    assert response.status_code == 401
    assert response.json["error_description"] == "the token is too long"


def test_a_step_6_refresh_token_opens_no_stream(client, monkeypatch):
    # With the one JWT_SECRET_KEY the README recommends for all steps, a token minted for
    # another purpose must still be refused: only access tokens (typ at+jwt) open streams.
    monkeypatch.setitem(refresh_server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    pair = refresh_server.app.test_client().post("/generate_token", json={"user_id": "Al"}).json
    response = client.get("/stream?count=1", headers=bearer(pair["refresh_token"]))
    assert response.status_code == 401, response.text
    assert response.json["error_description"] == NOT_AN_ACCESS_TOKEN


def test_a_token_streams_its_own_user_only(client):
    for user in ["Alice", "Bob"]:
        response = client.get("/stream?count=2", headers=bearer(token_for(user)))
        assert response.status_code == 200
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.text == f"chunk 1 of 2 for {user}\nchunk 2 of 2 for {user}\n"


def test_there_is_no_way_to_name_another_user(client):
    response = client.get("/stream?count=1&user_id=Bob", headers=bearer(token_for("Alice")))
    assert response.text == "chunk 1 of 1 for Alice\n"
    assert client.get("/stream/Bob", headers=bearer(token_for("Alice"))).status_code == 404


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer   ", "Basic QWxpY2U6cGFzcw==", "Token abc"]
)
def test_no_bearer_credentials_get_a_bare_challenge(client, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/stream", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert "Authorization: Bearer" in response.json["error"]
    assert "chunk" not in response.text


@pytest.mark.parametrize("spelling", ["Bearer {}", "bearer {}", "BEARER  {} "])
def test_the_bearer_scheme_in_any_case_and_with_spaces_around_the_token(client, spelling):
    # RFC 6750: the scheme is case-insensitive, and one or more spaces come before the token.
    headers = {"Authorization": spelling.format(token_for("Alice"))}
    response = client.get("/stream?count=1", headers=headers)
    assert response.status_code == 200, response.text


def tampered() -> str:
    header, _, signature = token_for("Alice").split(".")
    now = int(time.time())
    return f"{header}.{b64({'sub': 'Bob', 'iat': now, 'exp': now + 3600})}.{signature}"


def other_algorithm(alg: str) -> str:
    """A token that names an algorithm the server does not accept, signature or not."""
    now = int(time.time())
    claims = {"sub": "Alice", "iat": now, "exp": now + 3600}
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}.c2lnbmF0dXJl"


NOW = int(time.time())
NOT_AN_ACCESS_TOKEN = "not an access token (its JWT header lacks typ at+jwt)"
BAD_TOKENS = {
    "garbage": ("not-a-jwt", "the token is malformed"),
    "two segments": ("abc.def", "the token is malformed"),
    "header not json": ("bm90IGpzb24.e30.c2ln", "the token is malformed"),
    "wrong key": (token_for(key=OTHER_KEY), "the token signature does not match"),
    "tampered payload": (tampered(), "the token signature does not match"),
    "no signature": (token_for().rsplit(".", 1)[0] + ".", "the token signature does not match"),
    "alg none": (token_for(key=None, algorithm="none"), "the token is not signed with HS256"),
    "HS512": (token_for(algorithm="HS512"), "the token is not signed with HS256"),
    "RS256": (other_algorithm("RS256"), "the token is not signed with HS256"),
    "expired": (token_for(iat=NOW - 120, exp=NOW - 60), "the token has expired"),
    "nbf in the future": (token_for(nbf=NOW + 3600), "the token is not valid yet"),
    "iat in the future": (token_for(iat=NOW + 3600), "the token is not valid yet"),
    "no sub": (token_for(sub=None), "the token lacks a required claim (sub, iat or exp)"),
    "no iat": (token_for(iat=None), "the token lacks a required claim (sub, iat or exp)"),
    "no exp": (token_for(exp=None), "the token lacks a required claim (sub, iat or exp)"),
    "numeric sub": (token_for(sub=42), "the token is malformed"),
    "text exp": (token_for(exp="tomorrow"), "the token is malformed"),
    "oversized": (token_for(padding="x" * 1000), "the token is too long"),
    "no typ": (token_for(typ=None), NOT_AN_ACCESS_TOKEN),
    "typ JWT": (token_for(typ="JWT"), NOT_AN_ACCESS_TOKEN),
}


@pytest.mark.parametrize("name", BAD_TOKENS)
def test_every_bad_token_gets_401_invalid_token_and_no_data(client, name, caplog):
    token, description = BAD_TOKENS[name]
    caplog.set_level(logging.INFO)
    response = client.get("/stream?count=3", headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f'{CHALLENGE}, error="invalid_token", error_description="{description}"'
    )
    assert response.json == {"error": "invalid_token", "error_description": description}
    assert "chunk" not in response.text
    assert token not in response.text
    assert token not in caplog.text
    assert TEST_KEY.decode() not in caplog.text
    assert server.tracker.snapshot() == {"active": {}, "served": 0, "pid": PID}


def test_status_needs_a_valid_token(client):
    assert client.get("/status").status_code == 401
    assert client.get("/status", headers=bearer(BAD_TOKENS["expired"][0])).status_code == 401
    client.get("/stream?count=1", headers=bearer(token_for("Alice")))
    response = client.get("/status", headers=bearer(token_for("Bob")))
    assert response.json == {"active": {}, "served": 1, "pid": PID}


def test_the_token_is_checked_before_the_numbers(client):
    assert client.get("/stream?count=0").status_code == 401
    response = client.get("/stream?count=0", headers=bearer(token_for()))
    assert response.status_code == 400
    assert response.json["error"].startswith("count must be")


def test_after_a_barrage_of_bad_input_the_server_still_serves(client):
    for token, _ in BAD_TOKENS.values():
        client.get("/stream", headers=bearer(token))
    for body in ["", "[]", "{", '{"user_id": 1}', "x" * 5000]:
        mint(client, data=body, content_type="application/json")
    token = mint(client, json={"user_id": "Survivor"}).json["access_token"]
    response = client.get("/stream?count=1", headers=bearer(token))
    assert response.text == "chunk 1 of 1 for Survivor\n"


# Against the real server, with the real client


def test_client_mints_shows_claims_and_streams(serve, capsys):
    argv = ["--url", serve(server.app), "--user", "Alice", "--count", "2", "--interval", "0"]
    assert secure_client.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    prefix = "token claims (not verified here): "
    claims = json.loads(lines[0].removeprefix(prefix))
    assert claims["sub"] == "Alice"
    assert claims["exp"] - claims["iat"] == 15 * 60
    expires = datetime.fromtimestamp(claims["exp"], timezone.utc)
    assert lines[1] == f"token expires at {expires:%H:%M:%S} UTC"
    assert lines[2].endswith("chunk 1 of 2 for Alice")
    assert lines[3].endswith("chunk 2 of 2 for Alice")
    assert lines[4].startswith("done: 2 chunks, 46 bytes in ")


def test_client_streams_with_a_token_minted_elsewhere(serve, capsys):
    argv = ["--url", serve(server.app), "--token", token_for("Bob"), "--count", "1"]
    assert secure_client.main(argv) == 0
    assert "chunk 1 of 1 for Bob" in capsys.readouterr().out


@pytest.mark.parametrize("exp", [10**20, -(10**20)])
def test_client_shows_a_token_whose_exp_is_no_date_without_a_traceback(serve, capsys, exp):
    token = token_for("Bob", exp=exp)
    argv = ["--url", serve(server.app), "--token", token, "--count", "1"]
    secure_client.main(argv)
    assert "token claims (not verified here)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (BAD_TOKENS["expired"][0], "the token has expired"),
        (BAD_TOKENS["wrong key"][0], "the token signature does not match"),
    ],
)
def test_client_prints_the_401_description(serve, capsys, token, message):
    assert secure_client.main(["--url", serve(server.app), "--token", token]) == 1
    assert capsys.readouterr().err == f"error: server answered 401: {message}\n"


def test_client_says_that_an_expired_token_has_expired(serve, capsys):
    token = token_for(iat=NOW - 120, exp=NOW - 60)
    assert secure_client.main(["--url", serve(server.app), "--token", token]) == 1
    out, err = capsys.readouterr()
    expired = datetime.fromtimestamp(NOW - 60, timezone.utc)
    assert out.splitlines()[1] == f"token has expired (at {expired:%Y-%m-%d %H:%M:%S} UTC)"
    assert err == "error: server answered 401: the token has expired\n"


def test_client_rejects_a_token_that_is_no_jwt(capsys):
    assert secure_client.main(["--token", "hello"]) == 1
    assert capsys.readouterr().err == "error: that is not a JWT (Not enough segments)\n"


def test_client_reports_a_refused_mint(serve, capsys):
    assert secure_client.main(["--url", serve(server.app), "--user", "no spaces"]) == 1
    assert capsys.readouterr().err == f"error: server answered 400: {USER_ID_RULE}\n"


def test_client_says_when_the_server_is_not_running(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert secure_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}/generate_token: is the server running? "
        "Start it with: python stream_server_multiuser_secure.py\n"
    )


@pytest.mark.parametrize("path", ["/stream", "/generate_token/"])
def test_a_url_with_a_path_gets_one_line_saying_so(serve, capsys, path):
    url = serve(server.app) + path
    assert secure_client.main(["--url", url]) == 1
    assert capsys.readouterr() == (
        "",
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}\n",
    )


def test_a_websocket_url_gets_one_line_saying_so(capsys):
    assert secure_client.main(["--url", "ws://127.0.0.1:5000"]) == 1
    assert capsys.readouterr().err == (
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        "not ws://127.0.0.1:5000\n"
    )


@pytest.mark.parametrize(
    ("other", "path", "answer"),
    [
        (stream_server.app, "/generate_token", "404"),  # step 1's server, still running
        (resume_server.app, "/stream", "200 application/x-ndjson"),  # step 7's mints too
    ],
    ids=["step 1", "step 7"],
)
def test_client_says_which_server_to_start_when_another_answers(
    serve, monkeypatch, capsys, other, path, answer
):
    monkeypatch.setitem(resume_server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    url = serve(other)
    assert secure_client.main(["--url", url, "--count", "1"]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}{path} answered {answer}: it is not step 3's server. "
        "Start it with: python stream_server_multiuser_secure.py\n"
    )


@pytest.mark.parametrize("body", ["[]", "{", "{}", '{"access_token": 1}'])
def test_client_says_which_server_to_start_when_another_sends_no_token(serve, capsys, body):
    other = Flask(__name__)
    other.post("/generate_token")(lambda: Response(body, mimetype="application/json"))
    url = serve(other)
    assert secure_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}/generate_token sent no token: it is not step 3's server. "
        "Start it with: python stream_server_multiuser_secure.py\n"
    )


@pytest.mark.parametrize("which", ["missing", "key", "folder"])
def test_a_cacert_that_holds_no_certificate_is_a_usage_error(tls, capsys, which):
    cacert = {"missing": "certs/nothing.pem", "key": tls.key_file, "folder": "tests"}[which]
    with pytest.raises(SystemExit) as exit:
        secure_client.main(["--cacert", cacert])
    assert exit.value.code == 2
    why = {"missing": "no such file"}.get(which, "no certificate in it; pass the CA's (client.pem)")
    assert capsys.readouterr().err.endswith(f"error: --cacert {cacert}: {why}\n")


def test_an_http_url_to_an_https_server_says_it_speaks_https(serve, tls, capsys):
    url = serve(server.app, tls.server_context).replace("https://", "http://")
    assert secure_client.main(["--url", url, "--cacert", tls.ca_file]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}/generate_token speaks HTTPS (started with --cert?): "
        "use https:// with --cacert\n"
    )


def test_streams_over_https_with_the_ca_trusted(serve, tls, capsys):
    url = serve(server.app, tls.server_context)
    argv = ["--url", url, "--count", "2", "--interval", "0", "--cacert", tls.ca_file]
    assert secure_client.main(argv) == 0
    assert "chunk 2 of 2 for User1" in capsys.readouterr().out


def test_a_client_that_does_not_trust_the_ca_says_so(serve, tls, capsys):
    url = serve(server.app, tls.server_context)
    assert secure_client.main(["--url", url, "--count", "1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot verify the certificate of {url}/generate_token")
    assert error.count("\n") == 1


def test_the_server_serves_https_only_with_cert_and_key(tls):
    with https_step("stream_server_multiuser_secure.py", tls) as url:
        minted = requests.post(
            f"{url}/generate_token", json={"user_id": "Al"}, verify=tls.ca_file, timeout=WAIT
        )
        assert minted.status_code == 200
        plain = url.replace("https", "http")
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{plain}/generate_token", json={"user_id": "Al"}, timeout=WAIT)


def test_an_https_url_to_an_http_server_says_it_speaks_plain_http(serve, tls, capsys):
    url = serve(server.app).replace("http://", "https://")
    assert secure_client.main(["--url", url, "--cacert", tls.ca_file]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}/generate_token speaks plain HTTP (started without --cert?): use http://\n"
    )


def test_the_wire_carries_chunks_only_with_a_valid_token(serve):
    url = serve(server.app) + "/stream?count=2&interval=0"
    sock, wire = show_chunks.send_request(url, [f"Authorization: Bearer {token_for('Alice')}"])
    with sock, wire:
        head = show_chunks.read_head(wire)
        assert head[0] == "HTTP/1.1 200 OK"
        assert "Transfer-Encoding: chunked" in head
        assert [payload for _, payload in show_chunks.read_chunks(wire)] == [
            b"chunk 1 of 2 for Alice\n",
            b"chunk 2 of 2 for Alice\n",
            b"",
        ]
    sock, wire = show_chunks.send_request(url, ["Authorization: Bearer forged"])
    with sock, wire:
        head = show_chunks.read_head(wire)
        assert head[0] == "HTTP/1.1 401 UNAUTHORIZED"
        assert "Transfer-Encoding: chunked" not in head
