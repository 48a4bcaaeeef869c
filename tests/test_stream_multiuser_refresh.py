"""Step 6: stream_server_multiuser_refresh.py, its refresh tokens (refresh_tokens.py) and its
client."""

import logging
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import redis
import requests

import refresh_tokens
import stream_client_multiuser_refresh as refresh_client
import stream_server as step_1_server
import stream_server_multiuser_refresh as server
import stream_server_multiuser_resume as resume_server
import stream_server_multiuser_secure as secure_server
import stream_server_websocket as websocket_server
from helpers import (
    HANDSHAKE,
    ROOT,
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    https_step,
    only_help,
    run_step,
    stop_step,
    token_for,
)
from services import Gunicorn, RedisServer

USED = "this refresh token was already used: its login is now revoked"
REVOKED = "this login was revoked: log in again"
NOT_ACCESS = "not an access token (its JWT header lacks typ at+jwt)"
NOT_REFRESH = "not a refresh token (its JWT header lacks typ refresh+jwt)"


@pytest.fixture(autouse=True)
def test_key_and_fresh_ledger(monkeypatch):
    for step in (server, secure_server, websocket_server, resume_server):
        monkeypatch.setitem(step.app.config, "JWT_SECRET_KEY", TEST_KEY)
    ledger = refresh_tokens.RefreshTokenLedger()
    ledger.open(None)  # in this process's memory, whatever REDIS_URL says
    monkeypatch.setattr(refresh_tokens, "ledger", ledger)


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


def refresh_token_for(**changes) -> str:
    """A forged refresh token: valid unless the arguments say otherwise."""
    return token_for(**{"typ": "refresh+jwt", "jti": "j" * 32, "family": "f" * 32, **changes})


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
    access = jwt.decode_complete(body["access_token"], TEST_KEY, algorithms=["HS256"])
    assert access["header"]["typ"] == "at+jwt"
    assert set(access["payload"]) == {"sub", "iat", "exp"}
    assert access["payload"]["exp"] - access["payload"]["iat"] == 60
    refreshing = jwt.decode_complete(body["refresh_token"], TEST_KEY, algorithms=["HS256"])
    assert refreshing["header"]["typ"] == "refresh+jwt"
    claims = refreshing["payload"]
    assert (claims["sub"], claims["exp"] - claims["iat"]) == ("Alice", 3600)
    assert len(claims["jti"]) == len(claims["family"]) == 32


def test_a_refresh_token_buys_a_new_pair_of_the_same_login_once(client):
    first = pair(client)
    second = refresh(client, first["refresh_token"])
    assert second.status_code == 200, second.text
    family = jwt.decode(first["refresh_token"], TEST_KEY, algorithms=["HS256"])["family"]
    new_claims = jwt.decode(second.json["refresh_token"], TEST_KEY, algorithms=["HS256"])
    assert new_claims["family"] == family
    third = refresh(client, second.json["refresh_token"])
    assert third.status_code == 200, third.text
    assert_refused(refresh(client, first["refresh_token"]), USED)


def test_the_reuse_of_a_refresh_token_revokes_its_whole_login(client):
    # RFC 9700, 4.14.2: the server cannot tell the thief from the owner, so it revokes
    # every token of the login; whoever refreshed first is refused at the next refresh.
    stolen = pair(client)["refresh_token"]
    other_login = pair(client)["refresh_token"]
    first = refresh(client, stolen)
    assert first.status_code == 200, first.text
    assert_refused(refresh(client, stolen), USED)  # the other party, with its copy
    assert_refused(refresh(client, first.json["refresh_token"]), REVOKED)
    assert refresh(client, other_login).status_code == 200  # another login is not touched


def test_an_access_token_cannot_be_refreshed(client):
    assert_refused(refresh(client, pair(client)["access_token"]), NOT_REFRESH)
    step_3_token = secure_server.app.test_client().post(
        "/generate_token", json={"user_id": "Alice"}
    )
    assert_refused(refresh(client, step_3_token.json["access_token"]), NOT_REFRESH)
    # Even one that carries every claim a refresh token has: the type decides.
    assert_refused(refresh(client, refresh_token_for(typ="at+jwt")), NOT_REFRESH)


def test_a_refresh_token_opens_no_stream_on_any_step(client):
    token = pair(client)["refresh_token"]
    response = client.get("/stream", headers=bearer(token))
    assert_refused(response, NOT_ACCESS)
    assert "chunk" not in response.text
    step_3 = secure_server.app.test_client().get("/stream", headers=bearer(token))
    assert_refused(step_3, NOT_ACCESS)
    step_5 = websocket_server.app.test_client().get("/ws", headers={**HANDSHAKE, **bearer(token)})
    assert_refused(step_5, NOT_ACCESS)
    step_7 = resume_server.app.test_client().get("/stream", headers=bearer(token))
    assert_refused(step_7, NOT_ACCESS)


def test_access_tokens_of_steps_3_and_6_open_each_others_streams(client):
    # A choice: both are access tokens for the same streams (typ at+jwt, the shared key),
    # so either step takes either.
    step_3 = secure_server.app.test_client()
    minted = step_3.post("/generate_token", json={"user_id": "Alice"}).json["access_token"]
    response = client.get("/stream?count=2&interval=0", headers=bearer(minted))
    assert response.status_code == 200, response.text
    assert response.text == "chunk 1 of 2 for Alice\nchunk 2 of 2 for Alice\n"
    response = step_3.get(
        "/stream?count=2&interval=0", headers=bearer(pair(client)["access_token"])
    )
    assert response.status_code == 200, response.text
    assert response.text == "chunk 1 of 2 for Alice\nchunk 2 of 2 for Alice\n"


def test_an_expired_refresh_token_is_refused(client):
    assert_refused(refresh(client, refresh_token_for(iat=1, exp=2)), "the token has expired")


def test_a_token_minted_on_a_clock_slightly_ahead_is_taken(client):
    ahead = int(time.time()) + 5
    response = refresh(client, refresh_token_for(iat=ahead))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("token", "description"),
    [
        (refresh_token_for(jti=None), "the token is malformed"),
        (refresh_token_for(family=None), "the token is malformed"),
        (refresh_token_for(family=5), "the token is malformed"),
        (
            refresh_token_for(key=b"a key of at least thirty-two bytes"),
            "the token signature does not match",
        ),
        (refresh_token_for(typ=None), NOT_REFRESH),
        (refresh_token_for(typ="JWT"), NOT_REFRESH),
    ],
)
def test_forged_or_incomplete_refresh_tokens_are_refused(client, token, description):
    assert_refused(refresh(client, token), description)


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"json": {}}, 400, 'send a JSON object with a string "refresh_token"'),
        ({"json": {"refresh_token": 5}}, 400, 'send a JSON object with a string "refresh_token"'),
        (
            {"data": "[" * 1000, "content_type": "application/json"},
            400,
            'the body must be a JSON object such as {"user_id": "User1"}',
        ),
        (
            {"data": "refresh_token=x", "content_type": "application/x-www-form-urlencoded"},
            415,
            "send the body as JSON, with Content-Type: application/json",
        ),
    ],
)
@pytest.mark.parametrize("path", ["/refresh_token", "/generate_token"])
def test_a_bad_token_request_gets_a_clear_error(client, path, kwargs, status, error):
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    if path == "/generate_token" and status == 400 and "json" in kwargs:
        error = "user_id is missing"  # step 3's authenticate() says so, as on every step
    assert response.json == {"error": error}


# The ledger: in this process, or in Redis


def test_without_redis_url_the_first_use_says_reuse_is_detected_in_this_process_only(
    client, monkeypatch, caplog
):
    monkeypatch.delenv("REDIS_URL", raising=False)
    fresh = refresh_tokens.RefreshTokenLedger()  # as under gunicorn
    monkeypatch.setattr(refresh_tokens, "ledger", fresh)
    assert "REDIS_URL" not in caplog.text  # nothing said at import or when made
    renewed = refresh(client, pair(client)["refresh_token"])
    assert renewed.status_code == 200
    # Chosen once: the next uses neither say it again nor choose again.
    assert refresh(client, renewed.json["refresh_token"]).status_code == 200
    said = [record.getMessage() for record in caplog.records]
    assert [line for line in said if "REDIS_URL" in line] == [
        "REDIS_URL is unset: reuse is detected within this process only"
    ]


def test_in_memory_the_ledger_forgets_each_entry_once_its_token_expires(monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(refresh_tokens, "time", lambda: clock[0])
    ledger = refresh_tokens.ledger  # in memory
    assert ledger.add("a", 1_000_010) and ledger.add("b", 1_000_020)
    assert not ledger.add("a", 1_000_010)  # used already
    assert ledger.has("a") and len(ledger) == 2
    clock[0] = 1_000_010.0  # a's token has expired: nothing it guards is valid any more
    assert not ledger.has("a") and ledger.has("b")
    assert ledger.add("c", 1_000_030)  # each addition drops what has expired
    assert len(ledger) == 2  # b and c: bounded memory, however many tokens were ever used
    clock[0] = 1_000_020.0
    assert not ledger.has("b") and ledger.has("c")


@pytest.mark.parametrize("redis_up", [True, False], ids=["Redis up", "Redis down"])
def test_with_redis_url_the_start_says_whether_redis_answers(
    redis_url, redis_server, caplog, redis_up
):
    caplog.set_level(logging.INFO)
    if not redis_up:
        redis_server.stop()
    try:
        refresh_tokens.RefreshTokenLedger().open(redis_url)
    finally:
        redis_server.start()
    [said] = [record.getMessage() for record in caplog.records]
    if redis_up:
        assert said == "REDIS_URL is set: used refresh tokens are kept in Redis"
    else:  # and why, in redis-py's words
        why = r"Error \d+ connecting to 127\.0\.0\.1:\d+\. Connection refused\."
        assert re.fullmatch(
            rf"REDIS_URL is set, but Redis does not answer \({why}\): "
            r"refreshes fail with 503 until it does",
            said,
        ), said


@pytest.fixture
def redis_ledger(monkeypatch, redis_url):
    ledger = refresh_tokens.RefreshTokenLedger()
    ledger.open(redis_url)
    monkeypatch.setattr(refresh_tokens, "ledger", ledger)
    return redis.Redis.from_url(redis_url, decode_responses=True)


def test_with_redis_the_ledger_keeps_each_entry_only_until_its_token_expires(client, redis_ledger):
    tokens = pair(client)
    claims = jwt.decode(tokens["refresh_token"], TEST_KEY, algorithms=["HS256"])
    assert refresh(client, tokens["refresh_token"]).status_code == 200
    assert_refused(refresh(client, tokens["refresh_token"]), USED)
    used, revoked = f"refresh:used:{claims['jti']}", f"refresh:revoked:{claims['family']}"
    assert sorted(redis_ledger.keys("refresh:*")) == sorted([used, revoked])
    # Bounded memory: Redis forgets each entry once no token it guards can be valid.
    assert 3600 <= redis_ledger.ttl(used) <= 3600 + refresh_tokens.CLOCK_LEEWAY
    assert 3600 <= redis_ledger.ttl(revoked) <= 3600 + refresh_tokens.CLOCK_LEEWAY


def test_with_redis_down_a_refresh_gets_503_and_works_once_it_is_back(
    client, redis_ledger, redis_server, caplog
):
    tokens = pair(client)
    redis_server.stop()
    try:
        response = refresh(client, tokens["refresh_token"])
        assert response.status_code == 503, response.text
        assert response.json == {"error": "refresh tokens cannot be checked now: retry soon"}
        assert "Traceback" not in caplog.text
    finally:
        redis_server.start()
    response = refresh(client, tokens["refresh_token"])
    assert response.status_code == 200, response.text
    assert_refused(refresh(client, tokens["refresh_token"]), USED)


@pytest.fixture(scope="module")
def evicting_redis():
    """A real redis-server set up as caches often are: 2 MB at most, and when full it deletes
    the least recently used keys, any of them (maxmemory-policy allkeys-lru)."""
    server = RedisServer({"maxmemory": "2mb", "maxmemory-policy": "allkeys-lru"})
    yield server
    server.close()


def flood(url: str) -> None:
    """Fill that Redis well past its maxmemory, as one user posting to ever-new chat rooms
    did (issue #20): it evicts whatever it used least recently."""
    store = redis.Redis.from_url(url)
    with store, store.pipeline(transaction=False) as pipe:
        for n in range(1000):
            pipe.set(f"flood:{n}", b"x" * 4096)
        pipe.execute()


def test_against_an_evicting_redis_the_ledger_fails_closed(client, evicting_redis, monkeypatch):
    # Before, a used refresh token whose key Redis had evicted bought a new pair once more.
    ledger = refresh_tokens.RefreshTokenLedger()  # as under gunicorn: opened at first use
    monkeypatch.setattr(refresh_tokens, "ledger", ledger)
    monkeypatch.setenv("REDIS_URL", evicting_redis.url)
    tokens = pair(client)
    first = refresh(client, tokens["refresh_token"])
    flood(evicting_redis.url)
    replayed = refresh(client, tokens["refresh_token"])
    assert (first.status_code, replayed.status_code) == (503, 503), replayed.text
    assert replayed.json == {"error": "refresh tokens cannot be checked now: retry soon"}


def test_the_ledger_checks_the_policy_at_every_use(client, redis_ledger, monkeypatch, caplog):
    # A Redis that was safe at start, and is told to evict at run time.
    tokens = pair(client)
    redis_ledger.config_set("maxmemory", "64mb")
    redis_ledger.config_set("maxmemory-policy", "volatile-lru")  # the ledger's keys expire
    try:
        response = refresh(client, tokens["refresh_token"])
        assert response.status_code == 503, response.text
        assert "maxmemory-policy volatile-lru" in caplog.text
        redis_ledger.config_set("maxmemory-policy", "noeviction")  # full: it refuses writes
        assert refresh(client, tokens["refresh_token"]).status_code == 200
    finally:
        redis_ledger.config_set("maxmemory", "0")


@pytest.mark.parametrize("step", ["stream_server_multiuser_refresh.py",
                                  "stream_server_multiuser_resume.py"])
def test_the_server_refuses_to_start_against_an_evicting_redis(step, evicting_redis):
    command = [sys.executable, step, "--port", str(free_port())]
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode(), "REDIS_URL": evicting_redis.url}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert "error: REDIS_URL: the Redis at REDIS_URL deletes keys when it is full " \
        "(maxmemory-policy allkeys-lru, maxmemory 2097152 bytes)" in result.stderr
    assert "set maxmemory-policy noeviction there" in result.stderr
    assert "Traceback" not in result.stderr


# The client: one login, many streams


def test_the_client_renews_its_access_token_between_streams_with_each_new_refresh_token(
    serve, monkeypatch, capsys
):
    # Access tokens that last 0 s by the client's clock (the server still takes them, within
    # its leeway): the client renews before every stream. Had it sent a used refresh token,
    # the server would have revoked the login, and the next renewal would have failed.
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 0)
    argv = ["--url", serve(server.app), "--user", "Bob", "--streams", "3"]
    assert refresh_client.main([*argv, "--count", "2", "--interval", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    received = [line.split("  ", 1)[1] for line in out if line.startswith("+")]
    assert received == ["chunk 1 of 2 for Bob", "chunk 2 of 2 for Bob"] * 3
    notes = [line for line in out if line.startswith("(")]
    assert notes == ["(the access token expired: refreshing the token)"] * 3
    assert sum(line.startswith("token claims (not verified here): ") for line in out) == 1
    assert out[-1].startswith("done: 6 chunks, 126 bytes in ")


def test_the_client_gives_up_when_the_refresh_is_refused(serve, monkeypatch, capsys):
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 0)
    # Born expired, and by more than the clock leeway: the first refresh is refused.
    monkeypatch.setitem(server.app.config, "REFRESH_LIFETIME", -60)
    argv = ["--url", serve(server.app), "--count", "1", "--interval", "0"]
    assert refresh_client.main(argv) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "(the access token expired: refreshing the token)"
    assert err == "error: server answered 401: the token has expired\n"


@pytest.mark.parametrize(
    ("app", "answer"),
    [
        (step_1_server.app, "/generate_token answered 404"),
        (secure_server.app, "/generate_token sent no pair of tokens"),
    ],
    ids=["step 1", "step 3"],
)
def test_the_client_says_which_server_to_start_when_another_one_answers(
    serve, capsys, app, answer
):
    url = serve(app)
    assert refresh_client.main(["--url", url, "--count", "2"]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}{answer}: it is not step 6's server. "
        "Start it with: python stream_server_multiuser_refresh.py\n"
    )


@pytest.mark.parametrize("trusted", [True, False], ids=["CA trusted", "CA unknown"])
def test_an_http_url_to_an_https_server_says_so(serve, tls, capsys, trusted):
    url = serve(server.app, tls.server_context).replace("https://", "http://")
    argv = ["--url", url, "--count", "1"] + (["--cacert", tls.ca_file] if trusted else [])
    assert refresh_client.main(argv) == 1
    error = capsys.readouterr().err
    assert error == (
        f"error: {url}/generate_token speaks HTTPS (started with --cert?): "
        "use https:// with --cacert\n"
    )
    assert "is the server running" not in error


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000/stream", "ws://127.0.0.1:5000"])
def test_the_url_is_the_servers_base_url(capsys, url):
    assert refresh_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}\n"
    )


# The script, and HTTPS


def test_the_server_says_at_start_where_it_detects_reuse(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    log = tmp_path / "server.log"
    stop_step(run_step("stream_server_multiuser_refresh.py", log, free_port()))
    started = log.read_text()
    assert "REDIS_URL is unset: reuse is detected within this process only" in started
    assert started.index("within this process only") < started.index("Running on")
    # Nothing at import: not a word until the server is started.
    imported = subprocess.run(
        [sys.executable, "-c", "import stream_server_multiuser_refresh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert (imported.returncode, imported.stdout, imported.stderr) == (0, "", "")


def test_streams_over_https_with_the_ca_trusted(serve, tls, capsys):
    url = serve(server.app, tls.server_context)
    argv = ["--url", url, "--count", "2", "--interval", "0", "--cacert", tls.ca_file]
    assert refresh_client.main(argv) == 0
    assert "chunk 2 of 2 for User1" in capsys.readouterr().out


def test_a_client_that_does_not_trust_the_ca_says_so(serve, tls, capsys):
    url = serve(server.app, tls.server_context)
    assert refresh_client.main(["--url", url, "--count", "1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot verify the certificate of {url}/generate_token")
    assert error.count("\n") == 1


def test_the_server_serves_https_only_with_cert_and_key(tls):
    with https_step("stream_server_multiuser_refresh.py", tls) as url:
        minted = requests.post(
            f"{url}/generate_token", json={"user_id": "Al"}, verify=tls.ca_file, timeout=WAIT
        )
        assert minted.status_code == 200
        plain = url.replace("https", "http")
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{plain}/generate_token", json={"user_id": "Al"}, timeout=WAIT)


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


# Under gunicorn, with the ledger in Redis


pytest_mark_gunicorn = pytest.mark.skipif(
    sys.platform == "win32", reason="gunicorn does not run on Windows"
)


class TwoWorkers(Gunicorn):
    """Step 6 under gunicorn.conf.py's two gthread workers, with REDIS_URL."""

    def __init__(self, redis_url: str) -> None:
        env = {"REDIS_URL": redis_url}
        super().__init__("stream_server_multiuser_refresh", "gthread", workers=2, env=env)
        for _ in range(2):  # both workers up, so that either may answer
            self.wait_for_line(r"Booting worker")

    def post(self, path: str, payload: dict) -> requests.Response:
        # A new connection each time (no session), so that either worker may answer.
        return requests.post(f"{self.url}{path}", json=payload, timeout=WAIT)

    def login(self) -> str:
        response = self.post("/generate_token", {"user_id": "Alice"})
        assert response.status_code == 200, response.text
        return response.json()["refresh_token"]


@pytest_mark_gunicorn
def test_under_gunicorn_a_refresh_token_works_once_across_workers_and_restarts(redis_url):
    gunicorn = TwoWorkers(redis_url)
    try:
        # Concurrent double use, again and again: exactly one of each pair succeeds.
        start = threading.Barrier(2)

        def use(token: str) -> int:
            start.wait(WAIT)
            return gunicorn.post("/refresh_token", {"refresh_token": token}).status_code

        with ThreadPoolExecutor(2) as pool:
            for _ in range(10):
                token = gunicorn.login()
                assert sorted(pool.map(use, [token, token])) == [200, 401]
        # Sequential reuse: refused every time, whichever worker answers.
        used = gunicorn.login()
        renewed = gunicorn.post("/refresh_token", {"refresh_token": used})
        assert renewed.status_code == 200, renewed.text
        for _ in range(10):
            reused = gunicorn.post("/refresh_token", {"refresh_token": used})
            assert reused.status_code == 401, reused.text
        unused = gunicorn.login()
    finally:
        gunicorn.stop()
    gunicorn = TwoWorkers(redis_url)
    try:
        # After a restart: the used token, and its revoked login, are still refused.
        reused = gunicorn.post("/refresh_token", {"refresh_token": used})
        assert reused.json()["error_description"] == REVOKED
        renewed = gunicorn.post(
            "/refresh_token", {"refresh_token": renewed.json()["refresh_token"]}
        )
        assert renewed.json()["error_description"] == REVOKED
        fresh = gunicorn.post("/refresh_token", {"refresh_token": unused})
        assert fresh.status_code == 200, fresh.text
    finally:
        gunicorn.stop()


def test_help_prints_only_the_help():
    # Nothing happens at import: no warning about the key before the reader asked for help.
    assert only_help("stream_server_multiuser_refresh.py")
