"""deploy/nginx.conf, run by Debian's nginx in front of the steps' apps: chunked streams, Server-
Sent Events and WebSockets pass through it as they are made, idle connections that would stop
gunicorn's gthread worker stop nobody, and two app instances share the load and cover for each
other. nginx runs the file itself, its addresses rewritten to free ports (tests/services.py)."""

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager

import pytest
import requests
import websocket

import show_chunks
import stream_client_sse
import stream_server
import stream_server_multiuser
import stream_server_sse
import stream_server_websocket
from helpers import (
    TEST_KEY,
    WAIT,
    free_port,
    next_of_type,
    open_ws,
    port_of,
    receive,
    send,
    wait_until,
)
from stream_client_sse import Event

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="nginx and gunicorn: Linux, macOS")

IDLE = 300  # connections that send half a request line and then nothing, as in the issue
HALF_A_REQUEST_LINE = b"GET /stream?count=3 HT"
# How long the test waits to see that gunicorn alone does not answer. That check cannot fail by
# chance (a blocked server never answers); it shows the problem and times nothing.
BLOCKED = 1.0



@contextmanager
def idle_connections(port: int, count: int = IDLE) -> Iterator[list[socket.socket]]:
    """`count` connections to 127.0.0.1:port that each send half a request line and then wait:
    a slowloris attack, bounded. All are closed when the block ends."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), WAIT))
            sock.sendall(HALF_A_REQUEST_LINE)
            sockets.append(sock)
        yield sockets


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes (or resets) this connection, waiting at most WAIT seconds."""
    sock.settimeout(WAIT)
    try:
        while sock.recv(4096):  # whatever nginx says before it closes
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# Streams pass through one piece at a time


@pytest.mark.parametrize(
    ("module", "path", "suffix"),
    [(stream_server, "/stream", ""), (stream_server_multiuser, "/stream/Alice", " for Alice")],
    ids=["step 1", "step 2"],
)
def test_each_chunk_passes_through_before_the_next_exists(
    serve, nginx, gate, monkeypatch, module, path, suffix
):
    monkeypatch.setattr(module, "sleep", gate.sleep)
    proxy = nginx(port_of(serve(module.app)))
    sock, wire = show_chunks.send_request(f"{proxy.url}{path}?count=2&interval=5", [])
    with sock, wire:
        sock.settimeout(WAIT)
        head = show_chunks.read_head(wire)
        assert head[0] == "HTTP/1.1 200 OK"
        assert "Transfer-Encoding: chunked" in head  # nginx frames the body for its client
        chunks = show_chunks.read_chunks(wire)
        assert next(chunks)[1] == f"chunk 1 of 2{suffix}\n".encode()
        gate.wait_for_pause()  # the app is holding chunk 2 back: chunk 1 came through alone
        gate.open()
        assert [payload for _, payload in chunks] == [f"chunk 2 of 2{suffix}\n".encode(), b""]


def test_each_event_passes_through_before_the_next_exists(serve, nginx, gate, monkeypatch):
    monkeypatch.setattr(stream_server_sse, "sleep", gate.sleep)
    proxy = nginx(port_of(serve(stream_server_sse.app)))
    with requests.get(f"{proxy.url}/events/Alice?count=1", stream=True, timeout=WAIT) as answer:
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        assert answer.headers["Transfer-Encoding"] == "chunked"
    # Step 4's own client, as a reader would run it, with nginx's URL.
    events = stream_client_sse.follow(f"{proxy.url}/events/Alice", {"count": 2, "interval": 5})
    assert next(events) == Event("chunk", "chunk 1 of 2 for Alice", "1")
    gate.wait_for_pause()  # the app is holding event 2 back: event 1 came through alone
    gate.open()
    assert list(events) == [
        Event("chunk", "chunk 2 of 2 for Alice", "2"),
        Event("end", "end of stream", "2"),
    ]


# WebSockets: the upgrade reaches the app


@pytest.fixture
def websocket_proxy(serve, nginx, monkeypatch):
    monkeypatch.setitem(stream_server_websocket.app.config, "JWT_SECRET_KEY", TEST_KEY)
    return nginx(port_of(serve(stream_server_websocket.app)))


def test_a_websocket_session_works_through_nginx(websocket_proxy):
    # With `proxy_set_header Connection ""`, as the README once said, the app never sees the
    # Upgrade: the handshake fails with 400 and this test with it.
    minted = requests.post(
        f"{websocket_proxy.url}/generate_token", json={"user_id": "Alice"}, timeout=WAIT
    )
    assert minted.status_code == 200, minted.text
    token = minted.json()["access_token"]
    with closing(open_ws(websocket_proxy.url, "count=1000&interval=0.05", token)) as ws:
        assert receive(ws) == {"type": "chunk", "number": 1, "text": "chunk 1 of 1000 for Alice"}
        send(ws, command="pause")
        assert next_of_type(ws, "ack")["paused"] is True
        # Paused: the next message is this ack. A minute apart, the chunk that is due at once
        # on resume is the only one before "stop", however slowly the machine runs.
        send(ws, command="interval", seconds=60)
        assert receive(ws) == {
            "type": "ack",
            "command": "interval",
            "paused": True,
            "stopped": False,
            "interval": 60,
        }
        send(ws, command="resume")
        assert receive(ws)["paused"] is False
        assert receive(ws)["type"] == "chunk"
        send(ws, command="stop")
        assert next_of_type(ws, "ack")["stopped"] is True
        assert receive(ws)["type"] == "end"


def test_a_websocket_without_a_token_gets_the_apps_401(websocket_proxy):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{websocket_proxy.port}/ws", timeout=WAIT)
    assert refused.value.status_code == 401
    assert refused.value.resp_headers["www-authenticate"] == 'Bearer realm="streams"'


# Slowloris: idle connections stop gthread alone, not gthread behind nginx


def test_idle_connections_to_nginx_do_not_stop_a_client_of_gthread(gunicorn, nginx):
    app = gunicorn("stream_server", "gthread", threads=8)  # one worker: 8 requests at a time
    proxy = nginx(app.port)
    with idle_connections(proxy.port):
        # nginx holds the 300 half requests itself; gunicorn never hears of them.
        answer = requests.get(f"{proxy.url}/stream?count=3&interval=0", timeout=WAIT)
        assert answer.status_code == 200, answer.text
        assert answer.text == "chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n"


def test_the_same_idle_connections_block_gthread_alone(gunicorn):
    # What nginx prevents. Every gthread thread waits for the rest of a request line, and the
    # probe waits behind the 292 others in the queue, for as long as they stay open.
    app = gunicorn("stream_server", "gthread", threads=8)
    with ExitStack() as stack:
        idle = stack.enter_context(idle_connections(app.port))
        probe = stack.enter_context(socket.create_connection(("127.0.0.1", app.port), WAIT))
        probe.sendall(b"GET /stream?count=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        probe.settimeout(BLOCKED)
        with pytest.raises(TimeoutError):
            probe.recv(4096)
        for sock in idle:  # the attacker gives up: the threads are free again
            sock.close()
        probe.settimeout(WAIT)
        assert probe.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")


def test_nginx_closes_connections_that_never_finish_their_request(nginx):
    # client_header_timeout, shortened from the file's 10 s so the test is quick.
    proxy = nginx(free_port(), client_header_timeout="1s")
    with idle_connections(proxy.port) as idle:
        assert all(closed_by_server(sock) for sock in idle)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to switch")
def test_nginx_runs_as_an_ordinary_user(serve, nginx):
    # Run by an ordinary user, every test here shows this already.
    proxy = nginx(port_of(serve(stream_server.app)), run_as="nobody")
    assert os.stat(f"/proc/{proxy.process.pid}").st_uid != 0
    answer = requests.get(f"{proxy.url}/stream?count=2&interval=0", timeout=WAIT)
    assert answer.status_code == 200, answer.text
    assert answer.text == "chunk 1 of 2\nchunk 2 of 2\n"


# Two app instances: the load is shared, and one can die


def test_requests_reach_both_instances_and_survive_one_dying(gunicorn, nginx):
    first, second = (gunicorn("stream_server_multiuser", "gthread") for _ in range(2))
    proxy = nginx(first.port, second.port)

    def pid(url: str) -> int:
        answer = requests.get(f"{url}/status", timeout=WAIT)
        assert answer.status_code == 200, answer.text
        return answer.json()["pid"]

    pids = {pid(first.url), pid(second.url)}
    assert {pid(proxy.url) for _ in range(4)} == pids  # round robin: both take requests
    first.stop()
    assert {pid(proxy.url) for _ in range(4)} == {pid(second.url)}
    answer = requests.get(f"{proxy.url}/stream/Bob?count=2&interval=0", timeout=WAIT)
    assert answer.status_code == 200, answer.text
    assert answer.text == "chunk 1 of 2 for Bob\nchunk 2 of 2 for Bob\n"


def test_sse_clients_whose_instance_dies_resume_on_the_other(gunicorn, nginx):
    instances = [gunicorn("stream_server_sse", "gevent") for _ in range(2)]
    proxy = nginx(*(instance.port for instance in instances))
    url = f"{proxy.url}/events/Reader?count=100000&interval=0.01"
    parser, events = stream_client_sse.SSEParser(), []
    with requests.get(url, stream=True, timeout=WAIT) as answer:
        assert answer.status_code == 200, answer.text
        pieces = answer.iter_content(chunk_size=None, decode_unicode=True)
        while not events:
            events += parser.feed(next(pieces))
        started = "events for Reader started: events 1 to"
        wait_until(lambda: any(instance.has_logged(started) for instance in instances))
        dead, alive = sorted(instances, key=lambda instance: not instance.has_logged(started))
        dead.stop()  # the stream breaks off: nginx cannot move it, the client must come back
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for text in pieces:
                events += parser.feed(text)
    assert events[-1].type == "chunk"  # cut off, not ended
    resume_at = int(parser.last_id) + 1
    # Two clients come back, as EventSource does, with the last id they saw. Round robin
    # sends one of them to the dead instance: nginx finds it refusing and passes the request
    # to the other, so both resume right after that id.
    for _ in range(2):
        headers = {"Last-Event-ID": parser.last_id}
        with requests.get(url, headers=headers, stream=True, timeout=WAIT) as answer:
            assert answer.status_code == 200, answer.text
            resumed, pieces = stream_client_sse.SSEParser(), answer.iter_content(None, True)
            while not (events := resumed.feed(next(pieces))):
                pass
        text = f"chunk {resume_at} of 100000 for Reader"
        assert events[0] == Event("chunk", text, str(resume_at))
    assert alive.has_logged(f"events for Reader started: events {resume_at} to 100000")
    wait_until(lambda: f'upstream: "http://127.0.0.1:{dead.port}/events/' in proxy.error_log())


def test_with_no_instance_answering_nginx_answers_json_too(nginx):
    # Without the config's error_page, nginx's own 502 would be an HTML page.
    proxy = nginx(free_port(), free_port())  # nobody listens on either
    response = requests.post(f"{proxy.url}/rooms/lobby/messages", json={"text": "hi"}, timeout=WAIT)
    assert response.status_code == 502, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": "no app instance answered: try again in a moment"}
