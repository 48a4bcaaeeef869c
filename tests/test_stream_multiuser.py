"""Step 2: stream_server_multiuser.py and stream_client_multiuser.py."""

import logging
import os
import re
import threading

import pytest
import requests

import show_chunks
import stream_client_multiuser
import stream_server
import stream_server_multiuser as server
from helpers import WAIT, chunked, free_port, raw_get, wait_until

pytestmark = pytest.mark.step(server)

PID = os.getpid()  # the tests' own process runs the servers


@pytest.fixture(autouse=True)
def fresh_tracker(monkeypatch):
    """Each test starts with nobody streaming and nothing served."""
    monkeypatch.setattr(server, "tracker", server.StreamTracker())


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(server, "sleep", lambda seconds: None)
    return server.app.test_client()


# Through Flask's test client


def test_every_line_names_its_user(client):
    response = client.get("/stream/Alice?count=2&interval=0")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert response.text == "chunk 1 of 2 for Alice\nchunk 2 of 2 for Alice\n"


@pytest.mark.parametrize("user_id", ["a", "User_1.x-y", "Z" * 64])
def test_user_ids_of_allowed_characters_stream(client, user_id):
    assert client.get(f"/stream/{user_id}?count=1").text == f"chunk 1 of 1 for {user_id}\n"


USER_ID_RULE = "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots"


@pytest.mark.parametrize(
    "user_id", ["Z" * 65, "bad user", "semi;colon", "émile", "<script>", "...", "%2E", "%2E%2E"]
)
def test_other_user_ids_get_400_json(client, user_id):
    response = client.get(f"/stream/{user_id}")
    assert response.status_code == 400
    assert response.json == {"error": USER_ID_RULE}
    assert server.tracker.snapshot() == {"active": {}, "served": 0, "pid": PID}


@pytest.mark.parametrize(
    ("query", "name"),
    [("count=0", "count"), ("interval=x", "interval"), ("count=%2B5", "count")],
)
def test_bad_numbers_get_400_json(client, query, name):
    response = client.get(f"/stream/Alice?{query}")
    assert response.status_code == 400
    assert response.json["error"].startswith(f"{name} must be")


def test_status_counts_open_streams_per_user_and_all_served(client):
    assert client.get("/status").json == {"active": {}, "served": 0, "pid": PID}
    open_streams = []
    for user in ["Alice", "Alice", "Bob"]:
        response = client.get(f"/stream/{user}?count=5", buffered=False)
        next(iter(response.response))  # the stream has started
        open_streams.append(response)
    expected = {"active": {"Alice": 2, "Bob": 1}, "served": 3, "pid": PID}
    assert client.get("/status").json == expected
    for response in open_streams[1:]:
        response.close()  # what the server does when a client hangs up
    assert client.get("/status").json == {"active": {"Alice": 1}, "served": 3, "pid": PID}
    open_streams[0].close()
    assert client.get("/status").json == {"active": {}, "served": 3, "pid": PID}


def test_a_finished_stream_is_no_longer_active(client):
    client.get("/stream/Alice?count=2")
    assert client.get("/status").json == {"active": {}, "served": 1, "pid": PID}


def test_index_names_the_routes(client):
    assert "/stream/<user_id>" in client.get("/").text


# Against the real server, on the wire


def test_the_wire_carries_chunked_framing(serve):
    answer = raw_get(serve(server.app), "/stream/Bob?count=2&interval=0")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert body == chunked(b"chunk 1 of 2 for Bob\n", b"chunk 2 of 2 for Bob\n")


def test_fifty_users_stream_at_the_same_time(serve, monkeypatch, capsys):
    users = [f"User{n}" for n in range(1, 51)]
    # Each stream pauses once, between its two chunks; the barrier only lets them
    # go on when all fifty are paused at once, so they cannot have run one by one.
    everyone_streaming = threading.Barrier(len(users))
    monkeypatch.setattr(server, "sleep", lambda seconds: everyone_streaming.wait(WAIT))
    argv = ["--url", serve(server.app), "--count", "2", "--interval", "1", *users]
    assert stream_client_multiuser.main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    received = re.findall(r"\[(\w+)\] \+\d+\.\d\ds  chunk (\d) of 2 for (\w+)", "\n".join(lines))
    assert all(prefix == owner for prefix, _, owner in received), "a user saw another's line"
    assert sorted((user, n) for user, n, _ in received) == sorted(
        (user, n) for user in users for n in "12"
    )
    assert lines[-1] == f'server status: {{"active": {{}}, "pid": {PID}, "served": 50}}'


def test_a_client_that_hangs_up_is_no_longer_active(serve, gated, caplog):
    caplog.set_level(logging.INFO)
    base_url = serve(server.app)
    sock, wire = show_chunks.send_request(f"{base_url}/stream/Quitter?count=1000", [])
    with sock, wire:
        show_chunks.read_head(wire)
        next(show_chunks.read_chunks(wire))
        gated.wait_for_pause()
        assert requests.get(f"{base_url}/status", timeout=WAIT).json()["active"] == {"Quitter": 1}
    gated.open()  # the stream goes on, finds the socket closed, and its generator is closed

    def nobody_active() -> bool:
        return requests.get(f"{base_url}/status", timeout=WAIT).json()["active"] == {}

    wait_until(nobody_active)
    assert "Quitter disconnected after" in caplog.text


def test_client_reports_each_users_error(serve, capsys):
    argv = ["--url", serve(server.app), "--count", "1", "Good", "bad user"]
    assert stream_client_multiuser.main(argv) == 1
    captured = capsys.readouterr()
    assert "[Good] " in captured.out
    assert captured.err == (
        "error: [bad user] server answered 400: "
        f"{USER_ID_RULE}\n"
    )


def test_client_says_once_when_the_server_is_not_running(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert stream_client_multiuser.main(["--url", url]) == 1  # three users
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}/status: is the server running? "
        "Start it with: python stream_server_multiuser.py\n"
    )


def test_client_says_once_which_server_to_start_when_another_step_answers(serve, capsys):
    url = serve(stream_server.app)  # step 1's server, still running on the port
    assert stream_client_multiuser.main(["--url", url, "--count", "2"]) == 1  # three users
    assert capsys.readouterr() == (
        "",
        f"error: {url}/status answered 404: it is not step 2's server. "
        "Start it with: python stream_server_multiuser.py\n",
    )


def test_the_url_is_the_servers_base_url(serve, capsys):
    url = serve(server.app)
    assert stream_client_multiuser.main(["--url", url + "/", "--count", "1", "Al"]) == 0
    assert "[Al] " in capsys.readouterr().out
    assert stream_client_multiuser.main(["--url", url + "/stream", "Al"]) == 1
    assert capsys.readouterr() == (
        "",
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}/stream\n",
    )


def test_client_reports_a_stream_cut_off_midway(serve, drop_connection, capsys):
    drop_connection(at_pause=1)
    argv = ["--url", serve(server.app), "--count", "3", "Alice"]
    assert stream_client_multiuser.main(argv) == 1
    assert capsys.readouterr().err == "error: [Alice] the stream was cut off before its end\n"
