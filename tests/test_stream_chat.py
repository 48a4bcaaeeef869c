"""Step 8: stream_server_chat.py and stream_client_chat.py, in this process on both backends
(the in-process default, fakeredis, and a real redis-server), then as two gunicorn -k gevent
instances that share one real Redis, and the page in headless Chromium."""

import codecs
import io
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from types import SimpleNamespace

import flask
import limits
import pytest
import redis
import requests
from selenium.webdriver.common.by import By

import client_errors
import rooms
import show_chunks
import stream_client_chat as chat_client
import stream_server_chat as server
from helpers import (
    ROOT,
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    only_help,
    port_of,
    run_step,
    save_screenshot,
    stop_step,
    token_for,
    wait_in_page,
    wait_until,
)
from services import Gunicorn
from stream_client_chat import Event, SSEParser

# What one user may take, as the server sets it: the tests of those bounds use it.
BOUNDS = {name: server.app.config[name] for name in ("POSTS", "NEW_ROOMS", "STREAMS")}
# The other tests post and follow as a few users, fast, in many rooms: far within these.
ROOMY = {"POSTS": "100000 per 1 second", "NEW_ROOMS": 100_000, "STREAMS": 1000}


@pytest.fixture(autouse=True)
def test_key(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    for name, value in ROOMY.items():
        monkeypatch.setitem(server.app.config, name, value)


@pytest.fixture
def room() -> str:
    """A room of its own for each test: the brokers and the Redis outlive a test."""
    return f"room-{uuid.uuid4().hex[:8]}"


class Follower:
    """A client following a room over a bare socket, reading in a thread of its own and
    keeping every event; close() hangs up, as a network failure would."""

    def __init__(self, base: str, room: str, user: str = "Reader", last_id: str = "", query=""):
        lines = [f"{name}: {value}" for name, value in bearer(token_for(user)).items()]
        lines += [f"Last-Event-ID: {last_id}"] if last_id else []
        url = f"{base}/rooms/{room}/events{query}"
        self.sock, self.wire = show_chunks.send_request(url, lines)
        self.sock.settimeout(WAIT)
        # The server subscribes before it answers, so from here on nothing posted is missed.
        self.head = show_chunks.read_head(self.wire)
        assert self.head[0] == "HTTP/1.1 200 OK", self.head
        self.parser = SSEParser()
        self.events: list = []
        self.error: Exception | None = None
        self.ended = threading.Event()  # the server ended the body (its final chunk) or it broke
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for _, payload in show_chunks.read_chunks(self.wire):
                self.events += self.parser.feed(decoder.decode(payload))
        except (OSError, ValueError, show_chunks.FramingError) as error:
            self.error = error
        finally:
            self.ended.set()

    def messages(self) -> list[dict]:
        return [json.loads(e.data) for e in self.events if e.type == "message"]

    def ids(self) -> list[str]:
        return [message["id"] for message in self.messages()]

    def wait_for(self, count: int) -> list[dict]:
        wait_until(lambda: len(self.messages()) >= count or self.ended.is_set())
        return self.messages()

    def wait_for_end(self) -> None:
        assert self.ended.wait(WAIT), "the stream never ended"

    def close(self) -> None:
        with suppress(OSError):  # the server may have closed it already
            self.sock.shutdown(socket.SHUT_RDWR)
        assert self.ended.wait(WAIT), "the reading thread is stuck"
        self.wire.close()
        self.sock.close()


@pytest.fixture
def follow():
    """follow(base, room, ...) opens a Follower; every one left open is closed after the test."""
    followers: list[Follower] = []

    def open_one(*args, **kwargs) -> Follower:
        followers.append(Follower(*args, **kwargs))
        return followers[-1]

    yield open_one
    for follower in followers:
        follower.close()


def post(base: str, room: str, text: str, user: str = "Alice") -> str:
    response = requests.post(
        f"{base}/rooms/{room}/messages", json={"text": text}, headers=bearer(token_for(user)),
        timeout=WAIT,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def presence(base: str, room: str) -> dict:
    response = requests.get(
        f"{base}/rooms/{room}/presence", headers=bearer(token_for("Observer")), timeout=WAIT
    )
    assert response.status_code == 200, response.text
    assert response.json()["room"] == room
    return response.json()["users"]


def in_order(ids: list[str]) -> bool:
    return all(server.order(a) < server.order(b) for a, b in itertools.pairwise(ids))


# In this process, on each backend: the default (fakeredis) and a real redis-server


@pytest.fixture(scope="module", params=["in-process", "redis"])
def chat(request):
    """The step's own broker(), made without REDIS_URL (fakeredis) or with a real Redis."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(server.app.extensions, "chat", raising=False)
        if request.param == "redis":
            patch.setenv("REDIS_URL", request.getfixturevalue("redis_server").url)
        else:
            patch.delenv("REDIS_URL", raising=False)
        broker = server.broker()
        patch.delenv("REDIS_URL", raising=False)
        yield broker
        server.app.extensions.pop("chat")  # parked below: not left for the tests that follow
    park(broker)


def park(broker) -> None:
    """Once its tests are done: the broker's reader thread waits forever on nothing, so that
    it never touches Redis or logs in later tests, and its connections are closed."""
    parked = threading.Event()

    def xread(*args, **kwargs) -> None:
        parked.set()
        threading.Event().wait()

    reader, broker.reader = broker.reader, SimpleNamespace(xread=xread)
    broker.wake()
    assert parked.wait(WAIT), "the reader never came back for more"
    reader.close()
    broker.redis.close()


only_redis = pytest.mark.parametrize("chat", ["redis"], indirect=True)
only_in_process = pytest.mark.parametrize("chat", ["in-process"], indirect=True)


@pytest.fixture
def base(chat, serve) -> str:
    return serve(server.app)


@pytest.fixture
def client(chat):
    return server.app.test_client()


def test_a_message_reaches_every_subscriber_as_one_event(base, room, follow):
    alice, bob = follow(base, room, "Alice"), follow(base, room, "Bob")
    assert "Content-Type: text/event-stream; charset=utf-8" in alice.head
    assert "Cache-Control: no-cache" in alice.head
    assert "X-Accel-Buffering: no" in alice.head
    before = int(time.time())
    message_id = post(base, room, "hello, room\nsecond line: é", user="Alice")
    for follower in (alice, bob):
        assert follower.wait_for(1) == [
            {"id": message_id, "user": "Alice", "text": "hello, room\nsecond line: é",
             "time": follower.messages()[0]["time"]}
        ]
        assert before <= follower.messages()[0]["time"] <= int(time.time())
        assert [(e.type, e.id) for e in follower.events] == [("message", message_id)]
        assert follower.parser.retry_ms == 2000


def test_every_subscriber_sees_one_order_with_increasing_ids(base, room, follow):
    followers = [follow(base, room) for _ in range(3)]
    posters = [
        threading.Thread(target=lambda p=p: [post(base, room, f"{p}-{n}") for n in range(10)])
        for p in range(3)
    ]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join(WAIT)
    first = followers[0].wait_for(30)
    assert len(first) == 30
    assert in_order([m["id"] for m in first])
    for follower in followers[1:]:
        assert follower.wait_for(30) == first


@pytest.mark.parametrize("how", ["header", "query"])
def test_last_event_id_resumes_right_after_it(base, room, follow, how):
    ids = [post(base, room, f"message {n}") for n in range(5)]
    if how == "header":
        resumed = follow(base, room, last_id=ids[1])
    else:
        resumed = follow(base, room, query=f"?last_event_id={ids[1]}")
    assert [m["id"] for m in resumed.wait_for(3)] == ids[2:]
    later = post(base, room, "after the resume")
    assert resumed.wait_for(4)[-1]["id"] == later
    assert resumed.ids() == [*ids[2:], later]  # exactly once each, no reset
    assert [e.type for e in resumed.events] == ["message"] * 4


def test_the_log_says_when_a_stream_starts_and_from_where(base, room, follow, caplog):
    caplog.set_level("INFO", logger=server.__name__)
    first = post(base, room, "seen")
    post(base, room, "not yet seen")
    follow(base, room, "Alice", last_id=first)
    line = f"Alice in {room} started: 1 events of history first, then new ones"
    wait_until(lambda: line in [record.getMessage() for record in caplog.records])


def test_a_wake_up_costs_one_entry_and_never_fails_while_redis_is_down(
    chat, room, monkeypatch
):
    for _ in range(300):
        chat.wake()
    # Bounded: MAXLEN ~ 1 keeps the newest, and Redis drops old entries a node (100) at a time.
    assert chat.redis.xlen(chat.wake_key) < 150

    def xadd(*args, **kwargs):
        raise redis.ConnectionError("the test cut Redis off")

    inbox = chat.subscribe(room, "Al", None)[0]
    monkeypatch.setattr(chat.redis, "xadd", xadd)
    chat.unsubscribe(room, inbox)  # a stream that closes while Redis is down: no error


def test_resuming_at_the_newest_id_sends_only_new_messages(base, room, follow):
    ids = [post(base, room, f"message {n}") for n in range(3)]
    resumed = follow(base, room, last_id=ids[-1])
    later = post(base, room, "new")
    assert resumed.wait_for(1) == [resumed.messages()[0]]
    assert resumed.ids() == [later]


def test_a_client_ahead_of_this_process_gets_no_duplicate(chat, base, room, follow, monkeypatch):
    # A client that read messages on a quicker instance resumes here while this process's
    # reader has not handed them over yet: when it does, the client must not get them twice.
    first = follow(base, room)
    held, hand_over = threading.Event(), chat.hand_over

    def hand_over_late(*args) -> None:
        assert held.wait(WAIT)
        hand_over(*args)

    monkeypatch.setattr(chat, "hand_over", hand_over_late)
    ids = [post(base, room, f"message {n}") for n in range(2)]
    ahead = follow(base, room, last_id=ids[1])
    held.set()
    later = post(base, room, "later")
    wait_until(lambda: later in ahead.ids())
    assert ahead.ids() == [later]
    assert first.wait_for(3) == first.messages()
    assert first.ids() == [*ids, later]


def test_an_id_the_history_no_longer_holds_gets_a_reset_first(chat, base, room, follow):
    ids = [post(base, room, f"message {n}") for n in range(5)]
    chat.redis.xtrim(f"chat:{room}", maxlen=2, approximate=False)  # as MAXLEN ~ does, later
    resumed = follow(base, room, last_id=ids[0])
    resumed.wait_for(2)
    reset, *rest = resumed.events
    assert reset.type == "reset"
    assert json.loads(reset.data) == {"first_id": ids[3]}
    assert [e.id for e in rest] == ids[3:]  # what is kept, then live
    later = post(base, room, "new")
    assert resumed.wait_for(3)[-1]["id"] == later


def test_an_id_this_room_never_had_gets_a_reset(base, room, follow):
    ids = [post(base, room, f"message {n}") for n in range(2)]
    resumed = follow(base, room, last_id="1-0")
    resumed.wait_for(2)
    assert [(e.type, e.id) for e in resumed.events] == [
        ("reset", ""),
        ("message", ids[0]),
        ("message", ids[1]),
    ]
    empty = follow(base, f"{room}-empty", last_id="1-0")
    wait_until(lambda: empty.events)
    assert empty.events[0].type == "reset"
    assert json.loads(empty.events[0].data) == {"first_id": None}


def test_history_is_bounded_by_maxlen(chat, client, room, monkeypatch):
    monkeypatch.setitem(server.app.config, "HISTORY", 10)
    headers = bearer(token_for("Alice"))
    for n in range(250):
        response = client.post(f"/rooms/{room}/messages", json={"text": f"{n}"}, headers=headers)
        assert response.status_code == 201, response.text
    # MAXLEN ~ trims whole nodes of the Stream (100 entries each, by default): cheaper than
    # exactly 10, and never fewer.
    assert 10 <= chat.redis.xlen(f"chat:{room}") <= 110


def test_quiet_streams_carry_keep_alive_comments(client, room, monkeypatch):
    monkeypatch.setattr(server, "HEARTBEAT", 0.01)
    response = client.get(f"/rooms/{room}/events", headers=bearer(token_for("Alice")))
    body = iter(response.response)
    assert next(body) == b"retry: 2000\n\n"
    # One keep-alive after another, and the stream still carries a message after them.
    assert next(body) == b": keep-alive\n\n"
    assert next(body) == b": keep-alive\n\n"
    message_id = client.post(
        f"/rooms/{room}/messages", json={"text": "still here"}, headers=bearer(token_for("Bob"))
    ).json["id"]
    while (chunk := next(body)) == b": keep-alive\n\n":
        pass
    assert chunk.startswith(f"id: {message_id}\nevent: message\n".encode())
    response.close()


def test_presence_counts_open_streams_per_user(base, room, follow, monkeypatch):
    monkeypatch.setattr(server, "HEARTBEAT", 0.05)  # a stream that lost its client notices soon
    # Presence is rewritten every PRESENCE_TTL / 3 seconds anyway: 20 s here, beyond what
    # wait_until waits, so each change below shows because the change itself wrote it.
    monkeypatch.setitem(server.app.config, "PRESENCE_TTL", 60)
    assert presence(base, room) == {}
    alice = [follow(base, room, "Alice") for _ in range(2)]
    follow(base, room, "Bob")
    wait_until(lambda: presence(base, room) == {"Alice": 2, "Bob": 1})
    alice[0].close()
    wait_until(lambda: presence(base, room) == {"Alice": 1, "Bob": 1})


def test_a_join_that_redis_fails_halfway_leaves_no_one_behind(
    chat, base, room, follow, monkeypatch
):
    # The join has added its inbox when reading the history fails: the inbox must go again,
    # or it would wait for messages for ever and presence would count its user.
    monkeypatch.setitem(server.app.config, "PRESENCE_TTL", 60)  # see the test above
    follow(base, room, "Bob")
    wait_until(lambda: presence(base, room) == {"Bob": 1})

    def xrange(*args, **kwargs):
        raise redis.ConnectionError("the test cut Redis off")

    with monkeypatch.context() as cut:
        cut.setattr(chat.redis, "xrange", xrange)
        response = requests.get(
            f"{base}/rooms/{room}/events",
            headers={**bearer(token_for("Alice")), "Last-Event-ID": "1-0"},
            timeout=WAIT,
        )
    assert response.status_code == 503, response.text
    follow(base, room, "Carol")  # counted after Alice's join failed
    wait_until(lambda: presence(base, room) == {"Bob": 1, "Carol": 1})


def test_the_reader_blocks_between_messages_instead_of_spinning(chat, base, room, follow):
    # Each XREAD waits for something new; one that returned the same wake-up again and again
    # would spin, using a core and Redis, with nothing to show but its count of reads.
    alice = follow(base, room, "Alice")
    post(base, room, "first")
    alice.wait_for(1)
    reads = chat.reads
    for n in range(3):
        post(base, room, f"more {n}")
        alice.wait_for(2 + n)
    assert chat.reads - reads <= 10


def test_while_redis_is_down_the_reader_waits_a_second_between_tries(monkeypatch, caplog):
    tries, parked = threading.Semaphore(0), threading.Event()
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the third wait parks the reader for good
        waits.append(seconds)
        tries.release()
        if len(waits) == 3:
            parked.wait()

    monkeypatch.setattr(rooms, "sleep", sleep)
    down = redis.Redis(port=free_port(), decode_responses=True)  # nothing listens there
    rooms.Broker(down, {"QUEUE": 10, "PRESENCE_TTL": 30}, server.message_event)
    for _ in range(3):
        assert tries.acquire(timeout=WAIT), "the reader never waited"
    assert waits == [1, 1, 1]
    # It says so once, not at every try.
    assert caplog.text.count("Redis failed") == 1


def test_a_join_reaches_up_to_the_newest_id_by_number_not_by_text(chat, room):
    # "5-10" comes after "5-9", though not as text: where the stream starts, and where an
    # `overflow` tells its client to resume, must be 5-10.
    for message_id in ("5-9", "5-10"):
        chat.redis.xadd(f"chat:{room}", {"user": "Al", "text": message_id}, id=message_id)
    chat.redis.expire(f"chat:{room}", 60)  # as a post does: no key of the chat stays for good
    inbox, gap, kept, sent = chat.subscribe(room, "Bob", "5-9")
    chat.unsubscribe(room, inbox)
    assert (gap, [message_id for message_id, _ in kept], sent) == (None, ["5-10"], "5-10")


def test_a_slow_subscriber_is_let_go_with_overflow(chat, client, room, monkeypatch):
    monkeypatch.setitem(server.app.config, "QUEUE", 3)
    headers = bearer(token_for("Slow"))
    slow = client.get(f"/rooms/{room}/events", headers=headers)  # not read yet: it lags
    inbox = next(iter(chat.inboxes[room]))
    ids = [
        client.post(f"/rooms/{room}/messages", json={"text": f"{n}"}, headers=headers).json["id"]
        for n in range(8)
    ]
    wait_until(lambda: inbox not in chat.inboxes.get(room, {}))
    assert inbox.qsize() == 4  # three messages and the overflow: no more, however many follow
    events = SSEParser().feed(b"".join(slow.response).decode())
    assert [e.id for e in events if e.type == "message"] == ids[:3]
    assert events[-1].type == "overflow"
    assert json.loads(events[-1].data) == {"last_id": ids[2]}
    slow.close()
    # It resumes from the history, with nothing lost.
    resumed = client.get(f"/rooms/{room}/events", headers={**headers, "Last-Event-ID": ids[2]})
    body = iter(resumed.response)
    assert next(body) == b"retry: 2000\n\n"
    assert [SSEParser().feed(next(body).decode())[0].id for _ in ids[3:]] == ids[3:]
    resumed.close()


def test_a_subscriber_behind_gets_what_waits_in_one_write(chat, client, room):
    """The messages queued while a stream was not read go out together, in one chunk: one
    write and one switch for them all, not one each (bench/README.md measures it)."""
    headers = bearer(token_for("Behind"))
    behind = client.get(f"/rooms/{room}/events", headers=headers)
    body = iter(behind.response)
    assert next(body) == b"retry: 2000\n\n"
    inbox = next(iter(chat.inboxes[room]))
    ids = [
        client.post(f"/rooms/{room}/messages", json={"text": f"{n}"}, headers=headers).json["id"]
        for n in range(3)
    ]
    wait_until(lambda: inbox.qsize() == 3)
    assert [event.id for event in SSEParser().feed(next(body).decode())] == ids
    behind.close()


@only_redis
def test_redis_down_and_back(chat, base, room, follow, redis_server):
    alice = follow(base, room, "Alice")
    first = post(base, room, "before")
    alice.wait_for(1)
    redis_server.stop()
    try:
        alice.wait_for_end()
        assert alice.error is None  # a clean end: the final chunk, after an `error` event
        assert [e.type for e in alice.events] == ["message", "error"]
        headers = bearer(token_for("Alice"))
        posted = requests.post(
            f"{base}/rooms/{room}/messages", json={"text": "x"}, headers=headers, timeout=WAIT
        )
        assert posted.status_code == 503, posted.text
        assert posted.json() == {"error": "Redis is unavailable; try again in a moment"}
        for path in ("events", "presence"):
            answer = requests.get(f"{base}/rooms/{room}/{path}", headers=headers, timeout=WAIT)
            assert answer.status_code == 503, answer.text
    finally:
        redis_server.start()
    # Back, without a restart of ours: redis-py reconnects by itself. This Redis kept its
    # data in memory only, so the history is gone, and a client that resumes hears so.
    resumed = follow(base, room, "Alice", last_id=first)
    later = post(base, room, "after")
    resumed.wait_for(1)
    assert [(e.type, e.id) for e in resumed.events] == [("reset", ""), ("message", later)]
    assert json.loads(resumed.events[0].data) == {"first_id": None}


# Bad input, through Flask's test client


@only_in_process
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "text must be"),
        ({"text": ""}, "text must be"),
        ({"text": " \n\t "}, "text must be"),
        ({"text": "x" * 1001}, "text must be"),
        ({"text": 5}, "text must be"),
        ({"text": None}, "text must be"),
        ('{"text": "\\ud800"}', "text must be"),
        ("[]", "the body must be a JSON object"),
        ("{", "the body must be a JSON object"),
    ],
)
def test_bad_messages_get_400(client, body, error):
    headers = bearer(token_for("Alice"))
    if isinstance(body, dict):
        response = client.post("/rooms/lobby/messages", json=body, headers=headers)
    else:
        headers["Content-Type"] = "application/json"
        response = client.post("/rooms/lobby/messages", data=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json["error"].startswith(error)


@only_in_process
def test_rooms_of_any_case_take_texts_whose_first_line_is_blank(client):
    headers = bearer(token_for("Alice"))
    text = "\n  \nafter two blank lines"
    response = client.post("/rooms/Lobby-B.2/messages", json={"text": text}, headers=headers)
    assert response.status_code == 201, response.text


def test_the_longest_message_is_taken(client):
    headers = bearer(token_for("Alice"))
    longest = "😀" * 1000  # 12 bytes each once escaped as JSON: still under the body limit
    response = client.post("/rooms/lobby/messages", json={"text": longest}, headers=headers)
    assert response.status_code == 201, response.text
    assert server.STREAM_ID.fullmatch(response.json["id"])


@only_in_process
def test_bodies_that_are_not_json_or_too_big(client):
    headers = bearer(token_for("Alice"))
    wrong_type = client.post("/rooms/lobby/messages", data="hi", headers=headers)
    assert wrong_type.status_code == 415, wrong_type.text
    huge = client.post("/rooms/lobby/messages", json={"text": "x" * 20_000}, headers=headers)
    assert huge.status_code == 413, huge.text
    assert huge.json["error"]
    # 16 KiB exactly is taken, one byte more is not (spaces pad the JSON, not the text).
    headers["Content-Type"] = "application/json"
    for padding, status in [(0, 201), (1, 413)]:
        body = '{"text": "hi"}'
        body = body[:-1] + " " * (16 * 1024 - len(body) + padding) + "}"
        answer = client.post("/rooms/lobby/messages", data=body, headers=headers)
        assert answer.status_code == status, answer.text


@only_in_process
@pytest.mark.parametrize("path", ["/messages", "/events", "/presence"])
@pytest.mark.parametrize("name", ["bad%20room", "..", "x" * 65])
def test_a_bad_room_gets_400(client, path, name):
    method = client.post if path == "/messages" else client.get
    response = method(f"/rooms/{name}{path}", json={"text": "hi"}, headers=bearer(token_for()))
    assert response.status_code == 400, response.text
    assert response.json["error"].startswith("room must be 1 to 64 characters")


@only_in_process
@pytest.mark.parametrize("last_id", ["x", "12", "1-2-3", "-1-0", "12345678901234567890-0", "1-"])
def test_a_bad_last_event_id_gets_400(client, last_id):
    headers = {**bearer(token_for()), "Last-Event-ID": last_id}
    response = client.get("/rooms/lobby/events", headers=headers)
    assert response.status_code == 400
    assert response.json == {"error": "Last-Event-ID must be the id of an event this server sent"}


@only_in_process
@pytest.mark.parametrize("path", ["/rooms/lobby/events", "/rooms/lobby/presence"])
def test_every_room_route_needs_a_token(client, path):
    missing = client.get(path)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="streams"'
    for token in ("a.b.c", token_for(typ=None), token_for(key=b"another key " * 6)):
        refused = client.get(path, headers=bearer(token))
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    posted = client.post("/rooms/lobby/messages", json={"text": "hi"})
    assert posted.status_code == 401


@only_in_process
def test_tokens_are_minted_as_in_step_3(client):
    minted = client.post("/generate_token", json={"user_id": "Bob"})
    assert minted.status_code == 200, minted.text
    token = minted.json["access_token"]
    posted = client.post("/rooms/lobby/messages", json={"text": "hi"}, headers=bearer(token))
    assert posted.status_code == 201, posted.text
    assert client.post("/generate_token", json={"user_id": ".."}).status_code == 400


@only_in_process
def test_the_page_is_served(client):
    with client.get("/") as response:  # closing it closes the file it was sent from
        assert response.mimetype == "text/html"
        assert "fetch(" in response.text
        assert "Authorization" in response.text


def test_the_server_says_which_backend_serves_the_rooms(monkeypatch, caplog, redis_server):
    caplog.set_level("INFO")
    monkeypatch.delitem(server.app.extensions, "chat", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    server.broker()
    said = [record.getMessage() for record in caplog.records]
    assert said == [
        "REDIS_URL is unset: rooms live in this process, which serves them alone (no other "
        "worker or host sees them)"
    ]
    park(server.app.extensions.pop("chat"))
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    caplog.clear()
    server.broker()
    said = [record.getMessage() for record in caplog.records]
    assert said == ["rooms are in Redis: every process that shares it serves them"]
    park(server.app.extensions.pop("chat"))  # not left for the tests that follow


def test_the_server_starts_while_redis_is_down_and_answers_503(monkeypatch):
    monkeypatch.delitem(server.app.extensions, "chat", raising=False)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    server.broker()  # what the server does at start: no traceback, the rooms wait for Redis
    posted = server.app.test_client().post(
        "/rooms/lobby/messages", json={"text": "hi"}, headers=bearer(token_for("Al"))
    )
    assert posted.status_code == 503, posted.text
    # Not left for the tests that follow: its reader, retrying, next waits forever instead.
    parked, broker = threading.Event(), server.app.extensions.pop("chat")
    broker.write_presence = lambda: parked.set() or threading.Event().wait()
    assert parked.wait(WAIT), "the reader never tried again"


def test_the_server_serves_when_started_as_its_docstring_says(tmp_path, monkeypatch):
    # python stream_server_chat.py, with no REDIS_URL: the rooms in this one process.
    monkeypatch.delenv("REDIS_URL", raising=False)
    port, log = free_port(), tmp_path / "chat.log"
    # Ctrl-C reaches it as in a terminal, even where this run ignores SIGINT (started in the
    # background by a script): a handler, unlike an ignored signal, is not inherited.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = run_step("stream_server_chat.py", log, port)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        base = f"http://127.0.0.1:{port}"
        minted = requests.post(f"{base}/generate_token", json={"user_id": "Al"}, timeout=WAIT)
        bob = Follower(base, "lobby", "Bob")
        posted = requests.post(
            f"{base}/rooms/lobby/messages", json={"text": "hello"}, timeout=WAIT,
            headers=bearer(minted.json()["access_token"]),
        )
        assert posted.status_code == 201, posted.text
        [message] = bob.wait_for(1)
        assert (message["user"], message["text"]) == ("Al", "hello")
        bob.close()
        process.send_signal(signal.SIGINT)  # Ctrl-C: it exits, its reader thread with it
        process.wait(WAIT)
    finally:
        stop_step(process)
    assert "REDIS_URL is unset: rooms live in this process" in log.read_text()


def test_a_history_below_one_is_refused_at_start():
    command = [sys.executable, "stream_server_chat.py", "--history", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert "--history must be at least 1" in result.stderr


# The client, against the server in this process


@only_in_process
def test_client_says_one_message(base, room, follow, capsys):
    alice = follow(base, room, "Alice")
    assert chat_client.main(["--url", base, "--room", room, "--user", "Bob", "--say", "hi"]) == 0
    [message] = alice.wait_for(1)
    assert (message["user"], message["text"]) == ("Bob", "hi")
    assert capsys.readouterr().out == f"sent to {room} as Bob: id {message['id']}\n"


@only_in_process
def test_client_says_how_to_post_when_it_starts(base, room, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(chat_client, "follow", lambda *where: iter(()))
    assert chat_client.main(["--url", base, "--room", room, "--user", "Bob"]) == 0
    assert capsys.readouterr().err == (
        f"(in {room} as Bob: type a line, Enter posts it; Ctrl-C leaves)\n"
    )


def test_client_names_the_server_to_start_when_another_answers(serve, capsys):
    import stream_server_sse  # step 4 on the port: no /generate_token there

    assert chat_client.main(["--url", serve(stream_server_sse.app), "--say", "hi"]) == 1
    error = capsys.readouterr().err
    assert error.endswith("answered 404: it is not step 8's server. Start it with: "
                          "python stream_server_chat.py\n"), error


@only_in_process
def test_client_posts_each_typed_line(base, room, follow, monkeypatch):
    alice = follow(base, room, "Alice")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n   \nworld\r\n"))
    chat_client.post_lines(base, room, "Bob")
    assert [m["text"] for m in alice.wait_for(2)] == ["hello", "world"]


def test_client_prints_each_event_on_one_line(monkeypatch, capsys):
    message = {"id": "1-0", "user": "Alice", "text": "hi", "time": 1_700_000_000}
    events = [
        Event("message", json.dumps(message), "1-0"),
        Event("reset", '{"first_id": "5-0"}', "1-0"),
        Event("overflow", '{"last_id": "7-0"}', "7-0"),
        Event("error", '{"error": "Redis is unavailable"}', "7-0"),
    ]
    monkeypatch.setattr(chat_client, "follow", lambda *where: iter(events))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_client.main(["--room", "lobby", "--user", "Bob"]) == 0
    at = datetime.fromtimestamp(1_700_000_000).strftime("%H:%M:%S")
    assert capsys.readouterr().out.splitlines() == [
        f"{at} Alice: hi",
        '(reset: {"first_id": "5-0"})',
        '(overflow: {"last_id": "7-0"})',
        '(error: {"error": "Redis is unavailable"})',
    ]


class ClientThread:
    """stream_client_chat.follow() in a thread of its own; its events (or the error it ends
    with) in a queue."""

    def __init__(self, base: str, room: str, user: str) -> None:
        self.got: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, args=(base, room, user), daemon=True).start()

    def _run(self, *where) -> None:
        try:
            for event in chat_client.follow(*where):
                self.got.put(event)
        except chat_client.StreamError as error:
            self.got.put(error)

    def next(self):
        return self.got.get(timeout=WAIT)

    def stop(self, chat, room: str, monkeypatch) -> None:
        """End the stream, and the client gives up: nothing of it outlives the test."""
        monkeypatch.setattr(chat_client, "RECONNECTS", 0)
        end_streams(chat, room, "error")
        assert self.next().type == "error"
        assert str(self.next()) == "the server ended the stream, and 0 reconnections failed"


def end_streams(chat, room: str, reason: str) -> None:
    """End the room's streams in this process as the server does, with `reason` last."""
    wait_until(lambda: chat.inboxes.get(room))
    with chat.lock:
        for inbox in list(chat.inboxes[room]):
            chat.end(room, inbox, reason)


@only_in_process
def test_client_resumes_whenever_its_stream_ends(chat, base, room, monkeypatch, capsys):
    monkeypatch.setattr(server, "RETRY_MS", 10)
    carol = ClientThread(base, room, "Carol")
    wait_until(lambda: presence(base, room) == {"Carol": 1})
    first = post(base, room, "one")
    assert carol.next().id == first
    end_streams(chat, room, "overflow")
    assert carol.next().type == "overflow"
    second = post(base, room, "two")  # before or after it is back: it comes once, either way
    assert (carol.next().type, carol.got.qsize()) == ("message", 0)
    end_streams(chat, room, "error")
    assert carol.next().type == "error"
    third = post(base, room, "three")
    assert carol.next().id == third
    out = capsys.readouterr().out
    assert out == (
        f"(the server ended the stream; resuming after event {first} in 0.01s)\n"
        f"(the server ended the stream; resuming after event {second} in 0.01s)\n"
    )
    carol.stop(chat, room, monkeypatch)


@only_in_process
def test_client_waits_longer_after_each_503(chat, base, room, monkeypatch, capsys):
    waits: list[float] = []
    monkeypatch.setattr(chat_client, "time", SimpleNamespace(sleep=waits.append, time=time.time))
    outages = iter([True, True, False])

    def broker():  # Redis out of reach twice, then back
        if next(outages, False):
            raise redis.ConnectionError("Connection refused")
        return chat

    monkeypatch.setattr(server, "broker", broker)
    carol = ClientThread(base, room, "Carol")
    wait_until(lambda: chat.inboxes.get(room))
    posted = post(base, room, "made it")
    assert carol.next().id == posted
    assert waits == [2, 4]
    assert capsys.readouterr().out == (
        "(the server cannot reach Redis; resuming after event none in 2s)\n"
        "(the server cannot reach Redis; resuming after event none in 4s)\n"
    )
    carol.stop(chat, room, monkeypatch)


@only_in_process
def test_client_reports_bad_input_and_a_missing_server(base, capsys, monkeypatch):
    assert chat_client.main(["--url", base, "--room", "bad room", "--say", "hi"]) == 1
    assert capsys.readouterr().err.startswith("error: server answered 400: room must be")
    url = f"http://127.0.0.1:{free_port()}"
    assert chat_client.main(["--url", url, "--say", "hi"]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}: is the server running? "
        "Start it with: python stream_server_chat.py\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_client.main(["--url", url]) == 1
    assert capsys.readouterr().err.splitlines(keepends=True)[-1] == (
        f"error: cannot connect to {url}/rooms/lobby/events: is the server running? "
        "Start it with: python stream_server_chat.py\n"
    )


# Two gunicorn -k gevent instances sharing one real Redis: what no single process can show


def start_instance(
    redis_url: str, presence_ttl: int = 2, start: Callable[..., Gunicorn] = Gunicorn, **bounds
) -> Gunicorn:
    """`gunicorn -k gevent` running the chat step in one worker, with REDIS_URL, and a short
    bound for presence, so that a dead instance drops out within the test. `start` is
    Gunicorn itself, or the gunicorn fixture, which stops it when the test ends. The bounds
    on one user are ROOMY's, but for those given (POSTS="3 per 1 hour", say)."""
    env = {"REDIS_URL": redis_url, "CHAT_PRESENCE_TTL": str(presence_ttl)}
    env |= {f"CHAT_{name}": str(value) for name, value in {**ROOMY, **bounds}.items()}
    return start("stream_server_chat", "gevent", env=env)


@pytest.fixture(scope="module")
def instances(redis_server):
    """Two instances, A and B, that share the one Redis."""
    started = [start_instance(redis_server.url) for _ in range(2)]
    try:
        yield [instance.url for instance in started]
    finally:
        for instance in started:
            instance.process.terminate()  # both at once, then wait for each
        for instance in started:
            instance.stop()


def test_fan_out_across_instances(instances, room, follow):
    # 2 x 25 subscribers, and 4 posters (two on each instance) of 50 messages each, at once.
    followers = [follow(url, room, f"Reader{n}") for url in instances for n in range(25)]
    sent = {poster: [f"{poster}: {n}" for n in range(50)] for poster in range(4)}

    def post_all(poster: int) -> None:
        for text in sent[poster]:
            post(instances[poster % 2], room, text, user=f"Poster{poster}")

    posters = [threading.Thread(target=post_all, args=(poster,)) for poster in sent]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join(WAIT)
    first = followers[0].wait_for(200)
    assert len(first) == 200
    assert in_order([m["id"] for m in first])
    for poster, texts in sent.items():  # each poster's messages, all there, in its order
        assert [m["text"] for m in first if m["user"] == f"Poster{poster}"] == texts
    for follower in followers[1:]:
        assert follower.wait_for(200) == first  # every message exactly once, in one order


def test_resume_on_another_instance(instances, room, follow):
    a, b = instances
    on_a = follow(a, room)
    ids = [post(b, room, f"message {n}") for n in range(3)]
    assert on_a.wait_for(3)[-1]["id"] == ids[-1]
    on_a.close()  # the connection drops; meanwhile the room goes on
    ids += [post(a, room, f"message {n}") for n in range(3, 5)]
    on_b = follow(b, room, last_id=ids[2])
    later = post(a, room, "live")
    assert on_b.wait_for(3) == on_b.messages()
    assert on_b.ids() == [*ids[3:], later]  # no gap, no duplicate
    assert [e.type for e in on_b.events] == ["message"] * 3


def test_an_id_older_than_the_history_gets_a_reset_on_any_instance(
    instances, room, follow, redis_server
):
    ids = [post(instances[0], room, f"message {n}") for n in range(4)]
    store = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with store:
        store.xtrim(f"chat:{room}", maxlen=1, approximate=False)
    resumed = follow(instances[1], room, last_id=ids[0])
    resumed.wait_for(1)
    assert [(e.type, e.id) for e in resumed.events] == [("reset", ""), ("message", ids[3])]
    assert json.loads(resumed.events[0].data) == {"first_id": ids[3]}


def test_presence_counts_every_instance_and_forgets_a_dead_one(
    instances, redis_server, room, follow, gunicorn
):
    a, doomed = instances[0], start_instance(redis_server.url, presence_ttl=1, start=gunicorn)
    for _ in range(2):
        follow(a, room, "Alice")
    follow(doomed.url, room, "Bob")
    for url in (a, doomed.url):
        wait_until(lambda url=url: presence(url, room) == {"Alice": 2, "Bob": 1})
    doomed.kill()
    killed = time.monotonic()
    wait_until(lambda: presence(a, room) == {"Alice": 2})
    # Within the bound (CHAT_PRESENCE_TTL: 1 s here, 30 s by default), with a margin
    # for a busy machine.
    assert time.monotonic() - killed < 1 + 3


def test_redis_down_and_back_on_both_instances(instances, room, follow, redis_server):
    followers = [follow(url, room) for url in instances]
    first = post(instances[0], room, "before")
    for follower in followers:
        follower.wait_for(1)
    redis_server.stop()
    try:
        for follower in followers:
            follower.wait_for_end()
            assert follower.error is None  # the final chunk came: a clean end
            assert [e.type for e in follower.events] == ["message", "error"]
        for url in instances:
            refused = requests.post(
                f"{url}/rooms/{room}/messages", json={"text": "lost?"},
                headers=bearer(token_for("Alice")), timeout=WAIT,
            )
            assert refused.status_code == 503, refused.text
            assert refused.json() == {"error": "Redis is unavailable; try again in a moment"}
    finally:
        redis_server.start()
    resumed = [follow(url, room, last_id=first) for url in instances]
    later = post(instances[1], room, "after")
    for follower in resumed:
        follower.wait_for(1)
        assert [(e.type, e.id) for e in follower.events] == [("reset", ""), ("message", later)]


# Through nginx (deploy/nginx.conf) in front of both instances



def test_through_nginx_each_message_arrives_as_it_is_posted(
    instances, nginx, room, follow
):
    proxy = nginx(*(port_of(url) for url in instances))
    follower = follow(proxy.url, room)
    for n in range(3):
        # The next is posted only once this one has arrived: nothing waits in a buffer.
        posted = post(instances[n % 2], room, f"message {n}")
        assert follower.wait_for(n + 1)[-1]["id"] == posted


def test_through_nginx_a_client_whose_instance_dies_resumes_on_the_other(
    redis_server, nginx, room, gunicorn
):
    both = [start_instance(redis_server.url, start=gunicorn) for _ in range(2)]
    walker = reader = None
    try:
        proxy = nginx(*(port_of(instance.url) for instance in both))
        # The client itself, as a reader runs it (stdin stays open: it posts nothing).
        command = [sys.executable, "stream_client_chat.py", "--url", proxy.url, "--room", room]
        walker = subprocess.Popen(
            [*command, "--user", "Walker"], cwd=ROOT, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        printed: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [printed.put(line) for line in walker.stdout])
        reader.start()
        started = f"Walker in {room} started"
        wait_until(lambda: any(i.has_logged(started) for i in both))
        doomed, survivor = sorted(both, key=lambda i: not i.has_logged(started))
        assert printed.get(timeout=WAIT).startswith(f"(in {room} as Walker: type a line")
        first = post(survivor.url, room, "before", user="Bob")
        assert printed.get(timeout=WAIT).endswith(" Bob: before\n")
        doomed.kill()
        for n in range(2):
            post(survivor.url, room, f"while away {n}", user="Bob")
        # The client sees its connection break, waits the server's retry (2 s) and reconnects
        # through nginx, which finds the dead instance refusing and passes it to the other.
        post(survivor.url, room, "after", user="Bob")
        lines = [printed.get(timeout=WAIT) for _ in range(4)]
        assert lines[0] == f"(the connection was lost; resuming after event {first} in 2s)\n"
        assert [line.split(" ", 1)[1] for line in lines[1:]] == [
            "Bob: while away 0\n", "Bob: while away 1\n", "Bob: after\n"  # no gap, no duplicate
        ]
    finally:
        if walker:
            walker.kill()
            walker.wait(WAIT)
        if reader:
            reader.join(WAIT)
        if walker:
            walker.stdin.close()
            walker.stdout.close()


# The page in headless Chromium


def shown(page) -> list[tuple[str, str]]:
    """The messages a window shows: (user, text), in its order."""
    rows = page.find_elements(By.CSS_SELECTOR, "#messages li[data-id]")
    return [(row.get_attribute("data-user"), row.find_element(By.CLASS_NAME, "text").text)
            for row in rows]


def notes(page) -> list[str]:
    return [note.text for note in page.find_elements(By.CSS_SELECTOR, "#messages li.note")]


def page_says(page, text: str) -> None:
    box = page.find_element(By.ID, "say-text")
    box.send_keys(text)
    page.find_element(By.ID, "say").click()


def joined(page, url: str, room: str, user: str) -> None:
    page.get(f"{url}/?room={room}&user={user}")
    status = page.find_element(By.ID, "status")
    wait_in_page(page, lambda: status.text == f"in {room} as {user}", f"{user} joined")


def test_two_windows_on_two_instances_see_each_others_messages(instances, browser, room):
    joined(browser, instances[0], room, "Alice")
    alice = browser.current_window_handle
    browser.switch_to.new_window("window")
    joined(browser, instances[1], room, "Bob")
    bob = browser.current_window_handle
    page_says(browser, "hello from B")
    browser.switch_to.window(alice)
    wait_in_page(browser, lambda: shown(browser) == [("Bob", "hello from B")], "Bob's message")
    page_says(browser, "hello from A")
    expected = [("Bob", "hello from B"), ("Alice", "hello from A")]
    wait_in_page(browser, lambda: shown(browser) == expected, "Alice's message")
    browser.switch_to.window(bob)
    wait_in_page(browser, lambda: shown(browser) == expected, "both messages, in one order")
    browser.close()
    browser.switch_to.window(alice)


@only_in_process
def test_the_page_resumes_after_the_stream_ends(chat, base, browser, room, monkeypatch):
    monkeypatch.setattr(server, "RETRY_MS", 50)
    joined(browser, base, room, "Alice")
    post(base, room, "one", user="Bob")
    wait_in_page(browser, lambda: shown(browser) == [("Bob", "one")], "the first message")
    end_streams(chat, room, "error")  # as when the server loses Redis
    post(base, room, "two", user="Bob")  # while the page may still be away
    expected = [("Bob", "one"), ("Bob", "two")]
    wait_in_page(browser, lambda: shown(browser) == expected, "both, once each")
    assert notes(browser)[:1] == ["the server lost Redis: trying again"]
    assert notes(browser)[1].startswith("the server ended the stream: resuming after ")


@only_in_process
def test_the_page_tries_again_after_a_proxys_502(chat, base, browser, room, monkeypatch):
    monkeypatch.setattr(server, "RETRY_MS", 50)
    last_event_id, refused = server.last_event_id, []

    def once_502() -> str | None:
        if flask.request.headers.get("Last-Event-ID") and not refused:
            refused.append(True)  # what nginx answers while no instance is up
            flask.abort(502, "no app instance answered: try again in a moment")
        return last_event_id()

    monkeypatch.setattr(server, "last_event_id", once_502)
    joined(browser, base, room, "Alice")
    post(base, room, "one", user="Bob")
    wait_in_page(browser, lambda: shown(browser) == [("Bob", "one")], "the first message")
    end_streams(chat, room, "error")
    post(base, room, "two", user="Bob")
    expected = [("Bob", "one"), ("Bob", "two")]
    wait_in_page(browser, lambda: shown(browser) == expected, "both, once each")
    assert refused and notes(browser)[2].startswith("the server is away: resuming after ")


@only_in_process
def test_a_page_that_is_left_ends_its_stream_at_once(chat, base, browser, room, monkeypatch,
                                                     caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(server, "HEARTBEAT", 0.05)  # a write every 50 ms finds a closed socket
    joined(browser, base, room, "Alice")
    browser.get("about:blank")  # Chromium may keep the page, and its stream, in its cache
    wait_until(lambda: f"Alice in {room} ended after event" in caplog.text)


@only_redis
def test_screenshot_of_the_page(chat, base, browser, follow, monkeypatch):
    """For people to look at (test-artifacts/chat_page.png): a conversation, with one
    stream that ended and resumed."""
    monkeypatch.setattr(server, "RETRY_MS", 300)
    room = "lobby"
    joined(browser, base, room, "Alice")
    post(base, room, "Hi Alice! I am posting from a terminal.", user="Bob")
    wait_in_page(browser, lambda: len(shown(browser)) == 1, "Bob's message")
    page_says(browser, "Hi Bob! Yours came through Redis, like every message.")
    wait_in_page(browser, lambda: len(shown(browser)) == 2, "Alice's message")
    end_streams(chat, room, "error")
    follow(base, room, "Bob")  # Bob is here too, for the presence line
    post(base, room, "Redis was away a moment. Did you miss this one?", user="Bob")
    wait_in_page(browser, lambda: len(shown(browser)) == 3, "the message sent meanwhile")
    page_says(browser, "No: the page resumed after the last message it had.")
    wait_in_page(browser, lambda: len(shown(browser)) == 4, "the last message")
    here = browser.find_element(By.ID, "presence")
    wait_in_page(browser, lambda: here.text == "here: Alice, Bob", "who is here")
    assert save_screenshot(browser, "chat_page.png")


def test_help_prints_only_the_help():
    # Nothing happens at import: no warning about the key before the reader asked for help.
    assert only_help("stream_server_chat.py")


def test_many_subscribers_joining_at_once_wait_for_a_connection_instead_of_failing(chat, room):
    # Before, beyond the pool's connections a join failed with "Too many connections": a
    # 503 for the newcomer, and, when the reader's presence write found no connection, an
    # `event: error` for every open stream. Now the pool is bounded and a join waits.
    assert isinstance(chat.redis.connection_pool, redis.BlockingConnectionPool)
    assert chat.redis.connection_pool.max_connections == server.app.config["CONNECTIONS"]
    start, joined, failed = threading.Barrier(12), [], []

    def join(n: int) -> None:
        start.wait(WAIT)
        try:
            joined.append(chat.subscribe(room, f"User{n}", None)[0])
        except redis.RedisError as error:
            failed.append(error)

    threads = [threading.Thread(target=join, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    for inbox in joined:
        chat.unsubscribe(room, inbox)
    assert failed == []
    assert len(joined) == 12


def test_client_in_a_quiet_room_reconnects_when_the_server_goes(monkeypatch, capsys):
    # Before, a client that had seen no message yet took the first refused reconnection for
    # a server that had never run, and quit at once.
    class Quiet:  # a stream that says `retry:`, then ends: the server went away
        status_code, ok, headers, url = 200, True, {"Content-Type": "text/event-stream"}, ""

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def iter_content(self, chunk_size=None, decode_unicode=False):
            yield "retry: 2000\n\n"

    answers = iter([Quiet()])

    def get(*args, **kwargs):
        answer = next(answers, None)
        if answer is None:
            raise requests.ConnectionError("refused")
        return answer

    waits: list[float] = []
    monkeypatch.setattr(chat_client.requests, "get", get)
    monkeypatch.setattr(chat_client, "bearer", lambda base, user: {})
    monkeypatch.setattr(chat_client, "time", SimpleNamespace(sleep=waits.append))
    with pytest.raises(chat_client.StreamError, match="5 reconnections failed"):
        list(chat_client.follow("http://127.0.0.1:9", "lobby", "Alice"))
    assert waits == [2, 4, 8, 16, 32]


# Hostile users (issue #20): what one user may take, and what a retry may do


@only_in_process
@pytest.mark.parametrize(
    "text",
    ["\r\x1b[2K12:00:00 Bob: I owe her", "\x1b]2;owned\x07", "a\rb", "\x00", "\x7f", "\x9b2K"],
    ids=["erase-line", "retitle", "CR", "NUL", "DEL", "C1-CSI"],
)
def test_control_characters_in_text_get_400(client, text):
    # Before, they were stored, and the client printed them raw: Mallory's line became Bob's.
    headers = bearer(token_for("Mallory"))
    response = client.post("/rooms/lobby/messages", json={"text": text}, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json == {
        "error": "text must not contain control characters other than newline and tab"
    }


@only_in_process
def test_newline_and_tab_are_text(client, room):
    headers = bearer(token_for("Alice"))
    text = "two lines:\n\tand a tab"
    response = client.post(f"/rooms/{room}/messages", json={"text": text}, headers=headers)
    assert response.status_code == 201, response.text


def test_every_key_of_a_room_expires_once_it_is_idle(chat, client, room, monkeypatch):
    # Before, a room's Stream stayed forever: one user posting to ever-new rooms filled Redis.
    monkeypatch.setitem(server.app.config, "ROOM_TTL", 100)
    headers = {**bearer(token_for("Alice")), "Idempotency-Key": uuid.uuid4().hex}
    path = f"/rooms/{room}/messages"
    assert client.post(path, json={"text": "1"}, headers=headers).status_code == 201
    assert 90 <= chat.redis.ttl(f"chat:{room}") <= 100
    monkeypatch.setitem(server.app.config, "ROOM_TTL", 1000)
    del headers["Idempotency-Key"]
    assert client.post(path, json={"text": "2"}, headers=headers).status_code == 201
    assert chat.redis.ttl(f"chat:{room}") > 900  # each post starts the idle time again
    stream = client.get(f"/rooms/{room}/events", headers=headers)  # presence, a counted stream
    wait_until(lambda: chat.presence(room) == {"Alice": 1})
    # Whatever the chat step wrote, in this test or any before: nothing stays for good.
    keys = chat.redis.keys("chat*")
    assert {f"chat:{room}", f"chat-presence:{room}", "chat-streams:Alice"} <= set(keys)
    assert [key for key in keys if chat.redis.ttl(key) < 0] == []
    stream.close()


def test_new_rooms_per_user_and_hour_are_bounded(chat, client, monkeypatch):
    # Before, one user could open rooms without end (3,000 one-message rooms: +13.5 MB).
    monkeypatch.setitem(server.app.config, "NEW_ROOMS", BOUNDS["NEW_ROOMS"])
    user, rooms = f"Opener{uuid.uuid4().hex[:6]}", [uuid.uuid4().hex for _ in range(21)]
    headers = bearer(token_for(user))

    def post_to(room: str, who: dict = headers):
        return client.post(f"/rooms/{room}/messages", json={"text": "hi"}, headers=who)

    assert [post_to(room).status_code for room in rooms[:20]] == [201] * 20
    refused = post_to(rooms[20])
    assert refused.status_code == 429, refused.text
    assert refused.json == {"error": "too many new rooms: at most 20 per user and hour; post "
                                     "to a room that has messages, or wait"}
    assert 3500 < int(refused.headers["Retry-After"]) <= 3600
    assert not chat.redis.exists(f"chat:{rooms[20]}")
    assert post_to(rooms[0]).status_code == 201  # a room that exists: posting goes on
    assert post_to(rooms[20], bearer(token_for(f"{user}-2"))).status_code == 201  # another user


@only_in_process  # Flask-Limiter's storage here is memory; Redis's is tested across instances
def test_posts_past_the_rate_get_429_with_retry_after(client, room, monkeypatch):
    # Before, one user posted 1,200 messages in 3 s and trimmed everyone's history away.
    monkeypatch.setitem(server.app.config, "POSTS", "3 per 1 hour")  # the default's window: 4 s
    headers = bearer(token_for(f"Fast{uuid.uuid4().hex[:6]}"))
    answers = [
        client.post(f"/rooms/{room}/messages", json={"text": f"{n}"}, headers=headers)
        for n in range(4)
    ]
    assert [answer.status_code for answer in answers] == [201, 201, 201, 429]
    wait = int(answers[-1].headers["Retry-After"])
    assert 3500 < wait <= 3601  # rounded up
    assert answers[-1].json == {
        "error": f"too many messages: at most 3 per 1 hour per user; try again in {wait} s"
    }
    other = client.post(f"/rooms/{room}/messages", json={"text": "hi"}, headers=bearer(token_for()))
    assert other.status_code == 201  # another user is not held back


def test_the_default_post_rate_is_a_burst_of_20_then_5_a_second():
    rate = limits.parse(BOUNDS["POSTS"])
    assert (rate.amount, rate.get_expiry()) == (20, 4)


def test_open_streams_per_user_are_bounded(chat, client, monkeypatch):
    # Before, one self-minted token opened 1,000 streams and filled a gevent worker.
    monkeypatch.setitem(server.app.config, "STREAMS", 2)
    headers = bearer(token_for(f"Streamer{uuid.uuid4().hex[:6]}"))
    rooms = [uuid.uuid4().hex for _ in range(3)]  # counted per user, whatever the room
    opened = [client.get(f"/rooms/{room}/events", headers=headers) for room in rooms[:2]]
    assert [stream.status_code for stream in opened] == [200, 200]
    refused = client.get(f"/rooms/{rooms[2]}/events", headers=headers)
    assert refused.status_code == 429, refused.text
    assert refused.json == {"error": "too many open streams: at most 2 per user; close one first"}
    assert int(refused.headers["Retry-After"]) > 0
    opened[0].close()  # as when the server notices that its client left
    again = client.get(f"/rooms/{rooms[2]}/events", headers=headers)
    assert again.status_code == 200, again.text
    for stream in (again, opened[1]):
        stream.close()


def test_presence_is_written_when_a_stream_closes(chat, client, room, monkeypatch):
    # At once, not at the reader's next round: that is PRESENCE_TTL / 3 = 20 s away here, past
    # WAIT. (The server learns that a client hung up when a write to it fails: within a
    # HEARTBEAT, 15 s, at most.)
    monkeypatch.setitem(server.app.config, "PRESENCE_TTL", 60)
    stream = client.get(f"/rooms/{room}/events", headers=bearer(token_for("Pat")))
    wait_until(lambda: chat.presence(room) == {"Pat": 1})
    stream.close()
    wait_until(lambda: chat.presence(room) == {})


def lose_answers(monkeypatch, chat, room: str, times: int = 1) -> list[str]:
    """Make the first `times` writes to the room's Stream be stored, then time out, as when
    XADD's answer is lost; gives the ids that Redis gave them."""
    execute, lost = chat.redis.execute_command, []

    def stored_then_timed_out(*args, **options):
        result = execute(*args, **options)
        if f"chat:{room}" in args and args[0] != "XREVRANGE" and len(lost) < times:
            lost.append(result)
            raise redis.TimeoutError("Timeout reading from socket")
        return result

    monkeypatch.setattr(chat.redis, "execute_command", stored_then_timed_out)
    return lost


def test_a_retry_with_the_same_idempotency_key_stores_nothing_new(chat, client, room):
    def post_as(user: str, key: str, text: str = "once"):
        headers = {**bearer(token_for(user)), "Idempotency-Key": key}
        return client.post(f"/rooms/{room}/messages", json={"text": text}, headers=headers)

    first, again = post_as("Alice", "post-1"), post_as("Alice", "post-1")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json == first.json
    assert chat.redis.xlen(f"chat:{room}") == 1
    assert post_as("Alice", "post-2").json != first.json  # another post
    assert post_as("Bob", "post-1").json != first.json  # each user names their own posts
    assert chat.redis.xlen(f"chat:{room}") == 3
    post_as("Carol", "None")
    without = client.post(f"/rooms/{room}/messages", json={"text": "new"},
                          headers=bearer(token_for("Carol")))
    assert without.status_code == 201, without.text
    assert chat.redis.xlen(f"chat:{room}") == 5  # a post without a key is always new
    for key in ("", "with space", "x" * 101, "é"):
        refused = post_as("Alice", key)
        assert refused.status_code == 400, refused.text
        assert refused.json == {
            "error": "Idempotency-Key must be 1 to 100 printable ASCII characters"
        }


def test_a_post_whose_answer_was_lost_is_stored_once_when_retried(chat, client, room, monkeypatch):
    # Before, the POST answered 503 "try again", and the retry stored the message twice.
    lost = lose_answers(monkeypatch, chat, room)
    headers = {**bearer(token_for("Alice")), "Idempotency-Key": "k-1"}
    failed = client.post(f"/rooms/{room}/messages", json={"text": "once"}, headers=headers)
    assert failed.status_code == 503, failed.text
    retried = client.post(f"/rooms/{room}/messages", json={"text": "once"}, headers=headers)
    assert retried.status_code == 201, retried.text
    assert retried.json == {"id": lost[0]}
    assert chat.redis.xlen(f"chat:{room}") == 1


@only_in_process
def test_client_retries_a_post_with_the_same_key(chat, base, room, monkeypatch, capsys):
    lost, pauses = lose_answers(monkeypatch, chat, room), []
    monkeypatch.setattr(client_errors, "time", SimpleNamespace(sleep=pauses.append))
    assert chat_client.main(["--url", base, "--room", room, "--user", "Bob", "--say", "1"]) == 0
    assert capsys.readouterr().out == f"sent to {room} as Bob: id {lost[0]}\n"
    assert (pauses, chat.redis.xlen(f"chat:{room}")) == ([1], 1)


@only_in_process
def test_client_never_says_not_sent_when_it_may_be_stored(chat, base, room, monkeypatch, capsys):
    lose_answers(monkeypatch, chat, room, times=3)
    monkeypatch.setattr(client_errors, "time", SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    chat_client.post_lines(base, room, "Bob")
    assert capsys.readouterr().err == (
        f"error: {base}/rooms/{room}/messages answered 503, 3 times: "
        "it may or may not have been stored\n"
    )
    assert chat.redis.xlen(f"chat:{room}") == 1  # three tries, one message


@only_in_process
def test_client_says_why_the_server_answers_429(base, room, monkeypatch, capsys):
    monkeypatch.setitem(server.app.config, "POSTS", "1 per 1 hour")
    monkeypatch.setitem(server.app.config, "STREAMS", 0)
    where = ["--url", base, "--room", room, "--user", f"Quick{uuid.uuid4().hex[:6]}"]
    assert chat_client.main([*where, "--say", "one"]) == 0
    assert chat_client.main([*where, "--say", "two"]) == 1
    assert capsys.readouterr().err.startswith(
        "error: server answered 429: too many messages: at most 1 per 1 hour per user; "
        "try again in "
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_client.main(where) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: server answered 429: too many open streams: at most 0 per user; close one first"
    )


def test_bounds_hold_across_instances(redis_server, gunicorn, room, follow):
    # Counted in Redis, so a user gets no more by spreading requests over instances.
    a, b = (
        start_instance(redis_server.url, start=gunicorn, POSTS="3 per 1 hour", STREAMS=2).url
        for _ in range(2)
    )
    headers = bearer(token_for(f"Spreader{uuid.uuid4().hex[:6]}"))
    answers = [
        requests.post(f"{url}/rooms/{room}/messages", json={"text": "hi"}, headers=headers,
                      timeout=WAIT)
        for url in (a, b, a, b)
    ]
    assert [answer.status_code for answer in answers] == [201, 201, 201, 429]
    assert answers[-1].json()["error"].startswith("too many messages: at most 3 per 1 hour")
    assert int(answers[-1].headers["Retry-After"]) > 3500
    follow(a, room, "Yan")
    follow(b, room, "Yan")
    for url in (a, b):
        refused = requests.get(f"{url}/rooms/{room}/events", headers=bearer(token_for("Yan")),
                               timeout=WAIT)
        assert refused.status_code == 429, refused.text
        assert refused.json() == {
            "error": "too many open streams: at most 2 per user; close one first"
        }


def test_through_nginx_each_address_holds_at_most_limit_conn_requests(
    instances, nginx, room, follow
):
    proxy = nginx(*(port_of(url) for url in instances), limit_conn="per_address 2")
    first = follow(proxy.url, room)
    follow(proxy.url, room)
    headers = bearer(token_for("Reader"))
    refused = requests.get(f"{proxy.url}/rooms/{room}/events", headers=headers, timeout=WAIT)
    assert refused.status_code == 429, refused.text
    assert refused.json() == {
        "error": "too many connections from your address: close one, then try again"
    }
    first.close()  # nginx counts it no more once it sees the connection close
    wait_until(lambda: requests.get(f"{proxy.url}/rooms/{room}/presence", headers=headers,
                                    timeout=WAIT).status_code == 200)


@only_in_process
def test_the_page_retries_a_post_with_the_same_key(chat, base, browser, room, monkeypatch):
    lose_answers(monkeypatch, chat, room)
    joined(browser, base, room, "Alice")
    page_says(browser, "only once")
    wait_in_page(browser, lambda: shown(browser) == [("Alice", "only once")], "the message")
    wait_in_page(browser, lambda: browser.find_element(By.ID, "say-text").get_attribute("value")
                 == "", "the box emptied once the retry stored it")
    assert (notes(browser), chat.redis.xlen(f"chat:{room}")) == ([], 1)


@only_in_process
def test_the_page_says_why_the_server_answers_429(base, browser, room, monkeypatch):
    monkeypatch.setitem(server.app.config, "POSTS", "1 per 1 hour")
    user = f"Quick{uuid.uuid4().hex[:6]}"
    joined(browser, base, room, user)
    page_says(browser, "one")
    wait_in_page(browser, lambda: len(shown(browser)) == 1, "the first message")
    page_says(browser, " more")
    wait_in_page(browser, lambda: notes(browser), "a note")
    assert notes(browser)[0].startswith(
        "not sent: too many messages: at most 1 per 1 hour per user; try again in "
    )
    assert save_screenshot(browser, "chat_page_429.png")
    monkeypatch.setitem(server.app.config, "STREAMS", 0)
    browser.get(f"{base}/?room={room}&user={user}")
    status = browser.find_element(By.ID, "status")
    expected = "too many open streams: at most 0 per user; close one first"
    wait_in_page(browser, lambda: status.text == expected, "the stream's 429")
