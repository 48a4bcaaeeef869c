"""Step 7: stream_server_multiuser_resume.py and its client: a stream that ends when its
access token expires, and a client that resumes it with no gap."""

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import jwt
import pytest
from werkzeug.serving import make_server

import refresh_tokens
import stream_client_multiuser_resume as resume_client
import stream_server as step_1_server
import stream_server_multiuser_refresh as refresh_server
import stream_server_multiuser_resume as server
import stream_server_multiuser_secure as secure_server
import tokens
from helpers import ROOT, TEST_KEY, WAIT, bearer, free_port, only_help, run_step, stop_step

pytestmark = pytest.mark.step(server)


@pytest.fixture(autouse=True)
def test_key_and_fresh_ledger(monkeypatch):
    for step in (server, secure_server, refresh_server):
        monkeypatch.setitem(step.app.config, "JWT_SECRET_KEY", TEST_KEY)
    ledger = refresh_tokens.RefreshTokenLedger()
    ledger.open(None)  # in this process's memory, whatever REDIS_URL says
    monkeypatch.setattr(refresh_tokens, "ledger", ledger)
    monkeypatch.setattr(server, "tracker", server.StreamTracker())


@pytest.fixture
def client():
    return server.app.test_client()


def pair(client, user="Alice") -> dict:
    return client.post("/generate_token", json={"user_id": user}).json


def lines(response) -> list[dict]:
    return [json.loads(text) for text in response.text.splitlines()]


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


# The stream


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


def test_from_past_the_end_gets_400_instead_of_an_empty_stream(client):
    response = client.get("/stream?count=5&from=6", headers=bearer(pair(client)["access_token"]))
    assert response.status_code == 400, response.text
    assert response.json == {"error": "from must be at most count (5): there is no line 6"}


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


def test_status_counts_the_streams_as_in_step_3(client, clock):
    token = pair(client)["access_token"]
    client.get("/stream?count=2&interval=1", headers=bearer(token))
    client.get("/stream?count=5&interval=1&from=4", headers=bearer(token))
    assert client.get("/status", headers=bearer(token)).json == {
        "active": {},
        "served": 2,
        "pid": os.getpid(),
    }


def test_access_tokens_of_steps_3_and_7_open_each_others_streams(client):
    # A choice: both are access tokens for the same streams (typ at+jwt, the shared key),
    # so either step takes either; step 7 still stops the stream when the token expires.
    step_3 = secure_server.app.test_client()
    minted = step_3.post("/generate_token", json={"user_id": "Alice"}).json["access_token"]
    response = client.get("/stream?count=2&interval=0", headers=bearer(minted))
    assert response.status_code == 200, response.text
    assert lines(response)[-1] == {"end": "complete"}
    response = step_3.get(
        "/stream?count=2&interval=0", headers=bearer(pair(client)["access_token"])
    )
    assert response.status_code == 200, response.text
    assert response.text == "chunk 1 of 2 for Alice\nchunk 2 of 2 for Alice\n"


# The client: one stream across refreshes, drops and restarts


@pytest.fixture
def client_waits(monkeypatch) -> list[float]:
    """The client's pauses between retries, recorded instead of waited."""
    waits: list[float] = []
    fake_time = SimpleNamespace(sleep=waits.append, monotonic=time.monotonic)
    monkeypatch.setattr(resume_client, "time", fake_time)
    return waits


def test_the_client_gets_every_line_once_across_refreshes_and_a_drop(
    serve, clock, drop_connection, client_waits, monkeypatch, capsys
):
    # One-second tokens on the server's clock, which only its pauses move on (tokens are
    # minted by it too): expiries and the dropped connection come at the same lines each run.
    monkeypatch.setattr(tokens, "time", clock.time)
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 1)
    drop_connection(at_pause=5, real_sleep=True)  # the other pauses move the clock on
    argv = ["--url", serve(server.app), "--user", "Bob", "--count", "30", "--interval", "0.1"]
    assert resume_client.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    received = [line.split("  ", 1)[1] for line in out if line.startswith("+")]
    assert received == [f"chunk {n} of 30 for Bob" for n in range(1, 31)]
    notes = [line for line in out if line.startswith("(")]
    # 3 s of stream with 1-second tokens: at least two expiries, plus the dropped connection.
    assert sum("the access token expired" in note for note in notes) >= 2
    assert sum("the connection was lost" in note for note in notes) == 1
    assert client_waits == [1.0]
    assert out[-1].startswith("done: all 30 lines in ")


def test_the_client_gives_up_when_the_refresh_is_refused(serve, clock, monkeypatch, capsys):
    monkeypatch.setitem(server.app.config, "ACCESS_LIFETIME", 1)
    # Born expired, and by more than the clock leeway: the first refresh is refused.
    monkeypatch.setitem(server.app.config, "REFRESH_LIFETIME", -60)
    argv = ["--url", serve(server.app), "--count", "50", "--interval", "0.1"]
    assert resume_client.main(argv) == 1
    assert capsys.readouterr().err == "error: server answered 401: the token has expired\n"


def test_the_client_resumes_with_no_gap_across_a_restart_of_the_server(tmp_path):
    script, port, log = "stream_server_multiuser_resume.py", free_port(), tmp_path / "server.log"
    process = run_step(script, log, port)
    command = [sys.executable, "-u", "stream_client_multiuser_resume.py"]
    # A minute between lines: the server is stopped while it waits for line 2, whatever the
    # machine's speed; the restarted server sends line 2 at once, as the first of its stream.
    command += ["--url", f"http://127.0.0.1:{port}", "--count", "2", "--interval", "60"]
    client = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    output: list[str] = []
    try:
        for line in client.stdout:
            output.append(line)
            if "chunk 1 of 2" in line:
                stop_step(process)  # mid-stream: line 2 is due in a minute
            if line.startswith("("):  # the client noticed
                break
        process = run_step(script, log, port)  # the same port, the same key
        output += client.stdout
        assert client.wait(WAIT) == 0, "".join(output)
    finally:
        stop_step(process)
        client.kill()
        client.wait()
        client.stdout.close()
    received = [line.split("  ", 1)[1] for line in output if line.startswith("+")]
    assert received == ["chunk 1 of 2 for User1\n", "chunk 2 of 2 for User1\n"]
    assert "(the connection was lost: resuming from line " in "".join(output)


def test_the_client_gives_up_after_five_tries_with_doubling_pauses(
    client_waits, monkeypatch, capsys
):
    http = make_server("127.0.0.1", 0, server.app, threaded=True)
    threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True).start()

    def go_away(seconds: float) -> None:  # the server stops for good after line 1
        http.shutdown()
        http.server_close()
        raise ConnectionResetError("the server went away")

    monkeypatch.setattr(server, "sleep", go_away)
    argv = ["--url", f"http://127.0.0.1:{http.server_port}", "--count", "3"]
    assert resume_client.main(argv) == 1
    out, err = capsys.readouterr()
    assert "chunk 1 of 3 for User1" in out
    assert client_waits == [1, 2, 4, 8, 16]
    assert err == "error: the server does not answer, and 5 tries in a row brought nothing\n"


@pytest.mark.parametrize(
    ("app", "answer"),
    [
        (step_1_server.app, "/generate_token answered 404"),
        (secure_server.app, "/generate_token sent no pair of tokens"),
        (refresh_server.app, "/stream answered 200 text/plain; charset=utf-8"),
    ],
    ids=["step 1", "step 3", "step 6"],
)
def test_the_client_says_which_server_to_start_when_another_one_answers(
    serve, capsys, app, answer
):
    url = serve(app)
    assert resume_client.main(["--url", url, "--count", "2"]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}{answer}: it is not step 7's server. "
        "Start it with: python stream_server_multiuser_resume.py\n"
    )


def test_streams_over_https_with_the_ca_trusted(serve, tls, capsys):
    url = serve(server.app, tls.server_context)
    argv = ["--url", url, "--count", "2", "--interval", "0", "--cacert", tls.ca_file]
    assert resume_client.main(argv) == 0
    assert "chunk 2 of 2 for User1" in capsys.readouterr().out


def test_help_prints_only_the_help():
    # Nothing happens at import: no warning about the key before the reader asked for help.
    assert only_help("stream_server_multiuser_resume.py")
