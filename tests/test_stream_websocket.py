"""Step 5: stream_server_websocket.py and stream_client_websocket.py, on a real server."""

import io
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
from contextlib import closing, suppress

import flask_sock
import jwt
import pytest
import requests
import websocket

import serving_websocket
import stream_client_websocket as ws_client
import stream_server as step_1_server
import stream_server_multiuser_secure as step_3_server
import stream_server_websocket as server
from helpers import (
    HANDSHAKE,
    ROOT,
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    https_step,
    next_of_type,
    only_help,
    open_ws,
    receive,
    send,
    token_for,
    wait_until,
)


@pytest.fixture(autouse=True)
def test_key(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setitem(step_3_server.app.config, "JWT_SECRET_KEY", TEST_KEY)


@pytest.fixture
def base_url(serve) -> str:
    return serve(server.app)


@pytest.fixture
def server_sockets(monkeypatch) -> list:
    """Every simple-websocket Server that flask-sock makes, so a test can look at its queue of
    received messages (`input_buffer`), the one a flood would grow."""
    made = []

    class Recorded(flask_sock.Server):
        def __init__(self, *args, **kwargs) -> None:
            made.append(self)  # before the handshake, which lets the client go on
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(flask_sock, "Server", Recorded)
    return made


def test_a_stream_of_chunks_then_the_end(base_url):
    with closing(open_ws(base_url, "count=3&interval=0")) as ws:
        messages = [receive(ws) for _ in range(4)]
    assert messages == [
        {"type": "chunk", "number": 1, "text": "chunk 1 of 3 for Alice"},
        {"type": "chunk", "number": 2, "text": "chunk 2 of 3 for Alice"},
        {"type": "chunk", "number": 3, "text": "chunk 3 of 3 for Alice"},
        {"type": "end", "sent": 3},
    ]


def test_pause_holds_the_stream_and_resume_goes_on_where_it_was(base_url):
    with closing(open_ws(base_url)) as ws:
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


def test_stop_ends_the_stream_early(base_url):
    with closing(open_ws(base_url)) as ws:
        receive(ws)
        send(ws, command="stop")
        ack = next_of_type(ws, "ack")
        assert ack["stopped"] is True
        end = receive(ws)
        assert end["type"] == "end"
        assert 1 <= end["sent"] < 1000


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
        ("[" * 1000, 'send JSON such as {"command": "pause"}'),  # too deep for json.loads
    ],
)
def test_bad_messages_get_an_error_and_the_connection_stays(base_url, message, error):
    with closing(open_ws(base_url)) as ws:
        ws.send(message)
        assert next_of_type(ws, "error") == {"type": "error", "error": error}
        send(ws, command="stop")  # still connected, still obeying
        assert next_of_type(ws, "ack")["stopped"] is True


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
    headers = dict(HANDSHAKE)
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


def test_status_counts_the_websocket_streams_open_now(base_url):
    def status() -> dict:
        headers = bearer(token_for())
        response = requests.get(f"{base_url}/status", headers=headers, timeout=WAIT)
        assert response.status_code == 200, response.text
        return response.json()

    # Other tests' streams may still be ending in this process: only Watcher's are looked at.
    with closing(open_ws(base_url, "count=1000&interval=0.05", token_for("Watcher"))) as ws:
        receive(ws)  # counted from before its first chunk
        assert status()["active"].get("Watcher") == 1
    wait_until(lambda: "Watcher" not in status()["active"])


def test_plain_http_on_the_websocket_route_gets_a_clear_400(base_url):
    response = requests.get(f"{base_url}/ws", timeout=WAIT)
    assert response.status_code == 400
    assert response.json() == {
        "error": "/ws takes WebSocket connections only; the other routes, plain HTTP"
    }


class NoReaderThread(threading.Thread):
    """Stands in for simple-websocket's reader thread, and never runs: nothing notices a
    reset before the server's own next send does, the race a real server sometimes loses."""

    def start(self) -> None:
        pass


def test_a_client_that_resets_the_connection_is_logged_as_a_disconnect(
    base_url, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    options = {**server.app.config["SOCK_SERVER_OPTIONS"], "thread_class": NoReaderThread}
    monkeypatch.setitem(server.app.config, "SOCK_SERVER_OPTIONS", options)
    ws = open_ws(base_url, "count=1000000&interval=0", token_for("Resetter"))
    receive(ws)
    # SO_LINGER with a zero timeout: close() sends a reset (RST), not a goodbye (FIN).
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.sock.close()
    wait_until(lambda: "Resetter disconnected after" in caplog.text)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"Sec-WebSocket-Key": None}, 400, "Missing header, 'Sec-WebSocket-Key'"),
        ({"Sec-WebSocket-Version": "8"}, 426, "Sec-WebSocket-Version must be 13"),
    ],
)
def test_a_bad_handshake_with_a_valid_token_gets_a_clear_4xx(base_url, change, status, error):
    headers = {**HANDSHAKE, **change, **bearer(token_for())}
    headers = {name: value for name, value in headers.items() if value is not None}
    response = requests.get(f"{base_url}/ws", headers=headers, timeout=WAIT)
    assert response.status_code == status, response.text
    assert response.json()["error"].endswith(error)
    if status == 426:  # RFC 6455, 4.4: say which version the server speaks
        assert response.headers["Sec-WebSocket-Version"] == "13"


def test_a_flood_of_commands_is_closed_with_1008(base_url, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    # The server's clock stands still: its twenty commands arrive within one second
    # however slowly this machine runs.
    monkeypatch.setattr(serving_websocket, "monotonic", lambda: 0.0)
    ws = open_ws(base_url, "count=1000&interval=60", token_for("Flooder"))
    try:
        assert receive(ws)["type"] == "chunk"  # then none for 60 s
        for _ in range(serving_websocket.MAX_COMMANDS):
            send(ws, command="pause")
        for _ in range(serving_websocket.MAX_COMMANDS - 1):
            assert receive(ws)["type"] == "ack"
        opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.shutdown()  # not close(): the server has closed it
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert struct.unpack("!H", data[:2]) == (1008,)  # policy violation
    assert data[2:] == b"more than 20 commands at once"
    assert "Flooder sent too many commands: closed after 1 chunks" in caplog.text


def test_a_client_that_floods_without_reading_is_cut_off(base_url, caplog, server_sockets):
    caplog.set_level(logging.INFO)
    # interval=0: the server writes chunks as fast as the socket takes them, and this
    # client reads none, so the server soon has no room to send anything at all.
    ws = open_ws(base_url, "count=1000000&interval=0", token_for("Flooder"))
    command = json.dumps({"command": "resume", "padding": "x" * 4000})  # 4 KB, the most
    queue_lengths = []  # of simple-websocket's queue of received messages, after each send

    def flood() -> None:
        with suppress(OSError, websocket.WebSocketException):  # cut off, or closed below
            for _ in range(5000):  # 20 MB, if the server took it all
                ws.send(command)
                queue_lengths.append(len(server_sockets[0].input_buffer))

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        wait_until(lambda: "Flooder sent too many commands" in caplog.text)
    finally:
        ws.shutdown()  # a send blocked by a server that reads no more fails at once
        flooder.join(WAIT)
    assert len(queue_lengths) < 5000  # the server stopped taking the flood
    # How far simple-websocket's thread reads ahead of the stream's own depends on thread
    # scheduling: tens of messages here, never the thousands of a flood left to grow.
    assert max(queue_lengths) < 500


def test_commands_waiting_for_a_client_that_reads_nothing_are_bounded(
    base_url, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    # Stand-ins: a client that has stopped reading (its socket never has room), and a
    # clock that runs a second per look, so that only the commands waiting count.
    monkeypatch.setattr(serving_websocket.Channel, "has_room", lambda channel: False)
    seconds = iter(range(1_000_000))
    monkeypatch.setattr(serving_websocket, "monotonic", lambda: float(next(seconds)))
    ws = open_ws(base_url, "count=1000&interval=0", token_for("Stalled"))
    try:
        for _ in range(serving_websocket.MAX_COMMANDS + 1):
            send(ws, command="pause")
        # No room even for the closing message: the server ends the connection.
        with pytest.raises((OSError, websocket.WebSocketException)):
            ws.recv()
    finally:
        ws.shutdown()
    wait_until(lambda: "Stalled sent too many commands" in caplog.text)


def test_a_client_that_stops_reading_is_let_go_after_the_write_timeout(
    base_url, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    # A stand-in for a client that has stopped reading: its socket never has room again.
    # Before, the stream waited for room forever, holding its thread.
    monkeypatch.setattr(serving_websocket.Channel, "has_room", lambda channel: False)
    monkeypatch.setattr(serving_websocket, "WRITE_TIMEOUT", 0.2)
    ws = open_ws(base_url, "count=1000&interval=0", token_for("Staller"))
    try:
        wait_until(lambda: "Staller disconnected after" in caplog.text)
    finally:
        ws.shutdown()


def test_a_wrong_content_type_gets_415(base_url):
    response = requests.post(
        f"{base_url}/generate_token",
        data='{"user_id": "Bob"}',
        headers={"Content-Type": "text/plain"},
        timeout=WAIT,
    )
    assert response.status_code == 415, response.text
    assert response.json()["error"].startswith("send the body as JSON")


def test_the_server_serves_https_only_with_cert_and_key(tls, capsys):
    with https_step("stream_server_websocket.py", tls) as url:
        argv = ["--url", url, "--count", "2", "--interval", "0", "--commands"]
        assert ws_client.main([*argv, "--cacert", tls.ca_file]) == 0
        assert "< end: 2 chunks sent" in capsys.readouterr().out
        assert ws_client.main(argv) == 1  # the system's CAs do not know the test CA
        assert capsys.readouterr().err == (
            f"error: cannot verify the certificate of {url}/generate_token: "
            "pass its CA with --cacert\n"
        )
        plain = url.replace("https", "http")
        assert ws_client.main(["--url", plain]) == 1
        assert capsys.readouterr().err == (
            f"error: {plain}/generate_token speaks HTTPS (started with --cert?): "
            "use https:// with --cacert\n"
        )


def test_with_a_token_the_websocket_handshake_says_the_same(tls, capsys, base_url):
    # With --token nothing is minted first: the WebSocket's own handshake meets the problem.
    token = ["--token", token_for()]
    with https_step("stream_server_websocket.py", tls) as url:
        wss = url.replace("https", "wss")
        assert ws_client.main(["--url", url, *token]) == 1
        assert capsys.readouterr().err == (
            f"error: cannot verify the certificate of {wss}/ws: pass its CA with --cacert\n"
        )
        assert ws_client.main(["--url", url.replace("https", "http"), *token]) == 1
        assert capsys.readouterr().err == (
            f"error: {url.replace('https', 'ws')}/ws speaks HTTPS (started with --cert?): "
            "use https:// with --cacert\n"
        )
    assert ws_client.main(["--url", base_url.replace("http", "https"), *token]) == 1
    assert capsys.readouterr().err == (
        f"error: {base_url.replace('http', 'wss')}/ws speaks plain HTTP (started without "
        "--cert?): use http://\n"
    )


def test_cert_without_key_is_refused():
    command = [sys.executable, "stream_server_websocket.py", "--cert", "server.pem"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert result.stderr.endswith("error: --cert and --key go together\n")


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
        "< ack stop: stopping, interval 1.0s",
        answers[-1],
    ]
    assert answers[-1].startswith("< end: ")


def test_client_prints_the_refusal(base_url, capsys):
    token = token_for(iat=1, exp=2)
    assert ws_client.main(["--url", base_url, "--token", token]) == 1
    assert capsys.readouterr().err == "error: server answered 401: the token has expired\n"


def test_client_says_when_the_server_is_not_running(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert ws_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}/generate_token: is the server running? "
        "Start it with: python stream_server_websocket.py\n"
    )


def test_the_interactive_client_says_which_commands_it_takes(base_url, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pause\nstop\n"))
    assert ws_client.main(["--url", base_url, "--count", "1000", "--interval", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "type a command and Enter while the chunks arrive: pause, resume, interval <seconds>, stop"
    )
    assert lines[-2].endswith("< ack stop: stopping, interval 1.0s")


@pytest.mark.parametrize("url", ["ws://127.0.0.1:5000", "http://127.0.0.1:5000/ws", "localhost"])
def test_the_client_takes_the_servers_base_url_only(capsys, url):
    assert ws_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}\n"
    )


@pytest.mark.parametrize(
    ("step", "token", "answered"),
    [
        (step_1_server, None, "http://{}/generate_token answered 404"),
        (step_1_server, token_for(), "ws://{}/ws answered 404"),
        (step_3_server, None, "ws://{}/ws answered 404"),  # it mints tokens too, but has no /ws
    ],
)
def test_the_client_says_when_another_steps_server_answers(serve, capsys, step, token, answered):
    url = serve(step.app)
    argv = ["--url", url, "--count", "1"] + (["--token", token] if token else [])
    assert ws_client.main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: {answered.format(url.removeprefix('http://'))}: it is not step 5's server. "
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


def test_help_prints_only_the_help():
    # Nothing happens at import: no warning about the key before the reader asked for help.
    assert only_help("stream_server_websocket.py")
