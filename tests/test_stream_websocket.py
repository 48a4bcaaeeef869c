"""Step 5: stream_server_websocket.py and stream_client_websocket.py, on a real server."""

import json
import logging

import jwt
import pytest
import requests
import websocket

import stream_client_websocket as ws_client
import stream_server_websocket as server
from helpers import TEST_KEY, WAIT, free_port, token_for, wait_until


@pytest.fixture(autouse=True)
def test_key(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)


@pytest.fixture
def base_url(serve) -> str:
    return serve(server.app)


def open_ws(base_url: str, query: str = "count=1000&interval=0.05", token: str | None = None):
    url = f"{base_url.replace('http', 'ws')}/ws?{query}"
    return websocket.create_connection(
        url, header=[f"Authorization: Bearer {token or token_for()}"], timeout=WAIT
    )


def receive(ws) -> dict:
    return json.loads(ws.recv())


def send(ws, **command) -> None:
    ws.send(json.dumps(command))


def next_of_type(ws, kind: str) -> dict:
    """Read on until a message of this type; chunks in flight may come before it."""
    while (message := receive(ws))["type"] != kind:
        assert message["type"] == "chunk", message
    return message


def test_a_stream_of_chunks_then_the_end(base_url):
    ws = open_ws(base_url, "count=3&interval=0")
    try:
        messages = [receive(ws) for _ in range(4)]
    finally:
        ws.close()
    assert messages == [
        {"type": "chunk", "number": 1, "text": "chunk 1 of 3 for Alice"},
        {"type": "chunk", "number": 2, "text": "chunk 2 of 3 for Alice"},
        {"type": "chunk", "number": 3, "text": "chunk 3 of 3 for Alice"},
        {"type": "end", "sent": 3},
    ]


def test_pause_holds_the_stream_and_resume_goes_on_where_it_was(base_url):
    ws = open_ws(base_url)
    try:
        last = receive(ws)["number"]
        send(ws, command="pause")
        while (message := receive(ws))["type"] == "chunk":
            last = message["number"]
        assert message == {
            "type": "ack",
            "command": "pause",
            "paused": True,
            "stopped": False,
            "interval": 0.05,
        }
        # Paused, the server sends nothing but answers: the next message is this ack.
        send(ws, command="interval", seconds=0)
        assert receive(ws) == {
            "type": "ack",
            "command": "interval",
            "paused": True,
            "stopped": False,
            "interval": 0,
        }
        send(ws, command="resume")
        assert receive(ws)["paused"] is False
        assert receive(ws) == {
            "type": "chunk",
            "number": last + 1,
            "text": f"chunk {last + 1} of 1000 for Alice",
        }
    finally:
        ws.close()


def test_stop_ends_the_stream_early(base_url):
    ws = open_ws(base_url)
    try:
        receive(ws)
        send(ws, command="stop")
        ack = next_of_type(ws, "ack")
        assert ack["stopped"] is True
        end = receive(ws)
        assert end["type"] == "end"
        assert 1 <= end["sent"] < 1000
    finally:
        ws.close()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("pause please", 'send JSON such as {"command": "pause"}'),
        ("[1, 2]", 'send JSON such as {"command": "pause"}'),
        ('{"verb": "pause"}', 'send JSON such as {"command": "pause"}'),
        ('{"command": "jump"}', "unknown command 'jump': pause, resume, interval, stop"),
        ('{"command": "interval"}', "interval needs seconds, a number"),
        ('{"command": "interval", "seconds": "fast"}', "interval needs seconds, a number"),
        ('{"command": "interval", "seconds": true}', "interval needs seconds, a number"),
        ('{"command": "interval", "seconds": -1}', "seconds must be from 0 to 60"),
        ('{"command": "interval", "seconds": 61}', "seconds must be from 0 to 60"),
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays(base_url, message, error):
    ws = open_ws(base_url)
    try:
        ws.send(message)
        assert next_of_type(ws, "error") == {"type": "error", "error": error}
        send(ws, command="stop")  # still connected, still obeying
        assert next_of_type(ws, "ack")["stopped"] is True
    finally:
        ws.close()


@pytest.mark.parametrize(
    ("authorization", "description"),
    [
        (None, None),
        ("Bearer not-a-token", "the token is malformed"),
        (f"Bearer {token_for(iat=1, exp=2)}", "the token has expired"),
        (
            f"Bearer {token_for(key=b'another key that is 32 bytes long')}",
            "the token signature does not match",
        ),
    ],
)
def test_the_handshake_is_refused_with_401_before_the_upgrade(base_url, authorization, description):
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    if authorization:
        headers["Authorization"] = authorization
    response = requests.get(f"{base_url}/ws", headers=headers, timeout=WAIT)
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    if description is None:
        assert challenge == 'Bearer realm="streams"'
    else:
        assert challenge.endswith(f'error="invalid_token", error_description="{description}"')
        assert response.json()["error_description"] == description


def test_bad_numbers_are_refused_before_the_upgrade(base_url):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        open_ws(base_url, "count=0")
    assert refused.value.status_code == 400
    assert json.loads(refused.value.resp_body)["error"].startswith("count must be")


@pytest.mark.parametrize("paused", [False, True])
def test_a_client_that_vanishes_frees_its_stream(base_url, caplog, paused):
    caplog.set_level(logging.INFO)
    ws = open_ws(base_url, "count=1000&interval=0.05", token_for("Vanisher"))
    receive(ws)
    if paused:  # nothing is being sent: the server learns it only from the closed socket
        send(ws, command="pause")
        next_of_type(ws, "ack")
    ws.sock.close()  # gone, without a closing handshake
    wait_until(lambda: "Vanisher disconnected after" in caplog.text)


def test_plain_http_on_the_websocket_route_gets_a_clear_400(base_url):
    response = requests.get(f"{base_url}/ws", timeout=WAIT)
    assert response.status_code == 400
    assert response.json() == {
        "error": "/ws takes WebSocket connections only; the other routes, plain HTTP"
    }


def test_minting_works_and_refuses_bad_bodies(base_url):
    good = requests.post(f"{base_url}/generate_token", json={"user_id": "Bob"}, timeout=WAIT)
    assert jwt.decode(good.json()["access_token"], TEST_KEY, algorithms=["HS256"])["sub"] == "Bob"
    # The same minting as step 3, with step 3's messages.
    for body, error in [
        ({"user_id": "bad user"}, "user_id must be a string of"),
        ({"user": "Bob"}, "user_id is missing"),
        (["Bob"], "the body must be a JSON object"),
    ]:
        bad = requests.post(f"{base_url}/generate_token", json=body, timeout=WAIT)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"].startswith(error)


# The client


def test_client_steers_the_stream_with_scripted_commands(base_url, capsys):
    argv = ["--url", base_url, "--count", "1000", "--interval", "0.02", "--every", "0.05"]
    # After "interval 1" the stream cannot run out of its 1000 chunks before "stop" arrives.
    argv += ["--commands", "pause", "interval 1", "jump", "resume", "stop"]
    assert ws_client.main(argv) == 0
    lines = [line.split("  ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    sent = [line for line in lines if line.startswith(">")]
    answers = [line for line in lines if line.startswith("<") and "chunk " not in line]
    assert sent == ["> pause", "> interval 1", "> jump", "> resume", "> stop"]
    assert answers == [
        "< ack pause: paused, interval 0.02s",
        "< ack interval: paused, interval 1.0s",
        "< error from the server: unknown command 'jump': pause, resume, interval, stop",
        "< ack resume: running, interval 1.0s",
        "< ack stop: running, interval 1.0s",
        answers[-1],
    ]
    assert answers[-1].startswith("< end: ")


def test_client_prints_the_refusal(base_url, capsys):
    token = token_for(iat=1, exp=2)
    assert ws_client.main(["--url", base_url, "--token", token]) == 1
    assert capsys.readouterr().err == (
        "error: server refused the connection (401): the token has expired\n"
    )


def test_client_says_when_the_server_is_not_running(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert ws_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}: is the server running? "
        "Start it with: python stream_server_websocket.py\n"
    )


def test_typed_commands_become_json():
    assert json.loads(ws_client.command_message("pause\n")) == {"command": "pause"}
    assert json.loads(ws_client.command_message("interval 0.2")) == {
        "command": "interval",
        "seconds": 0.2,
    }
    assert json.loads(ws_client.command_message("interval soon")) == {
        "command": "interval",
        "seconds": "soon",
    }
