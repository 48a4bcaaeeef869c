"""Step 8: a chat room: one message fanned out to every subscriber of every process, via Redis.

New since step 4: a stream no longer comes from a generator per client. A message
POSTed to a room is stored once, in the room's Redis Stream, and each server
process reads new messages with ONE Redis connection and hands each of them to all
of its subscribers (rooms.py does that part). The message's id is its Stream id, so
a client that reconnects, to this process or any other, resumes from the stored
history with Last-Event-ID: no gap, no duplicate. Step 3's tokens say who is
talking; GET / serves a chat page.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_chat.py               # no REDIS_URL: rooms in memory, one process
    python stream_client_chat.py --room lobby --user Alice      # then type lines
    python stream_client_chat.py --room lobby --user Bob --say "hello, Alice"

Several processes share the rooms through Redis (the README puts nginx in front):

    export REDIS_URL=redis://127.0.0.1:6379/0      # with redis-server running
    gunicorn -k gevent -b 127.0.0.1:5000 stream_server_chat:app
    gunicorn -k gevent -b 127.0.0.1:5001 stream_server_chat:app
"""

import argparse
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Iterator

import redis
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException, ServiceUnavailable

# The rooms in Redis, shared by every process: one reader each, a bounded queue per
# subscriber, presence that expires, and bounds on what one user takes. See rooms.py.
from rooms import Broker, connect, limit_posts, limiter, order, take

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import RequestHandler

# Step 3's tokens, shared: see tokens.py. They say who is talking.
from tokens import authenticated_user, json_object, load_secret_key, tokens

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.register_blueprint(tokens)  # POST /generate_token, and 401s for bad tokens
limiter.init_app(app)  # 429 for a user who posts too fast, counted in Redis: see rooms.py
app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # a message of 1,000 characters, even escaped
app.config["HISTORY"] = 1000  # messages a room keeps, about (XADD MAXLEN ~): how far resume reaches
app.config["PRESENCE_TTL"] = 30  # seconds: a process that died stops being counted by then
app.config["QUEUE"] = 1000  # messages waiting for one subscriber; one more and it is let go
app.config["CONNECTIONS"] = 50  # to Redis, at most, from this process
app.config["ROOM_TTL"] = 24 * 60 * 60  # seconds: a room nobody posts to for so long is deleted
# What one user may take, over every process (429 beyond): a burst of 20 posts, 5 a second on
# average; new rooms an hour (each costs Redis memory for ROOM_TTL); streams open at once.
app.config |= {"POSTS": "20 per 4 seconds", "NEW_ROOMS": 20, "STREAMS": 10}
# Settings from the environment too, where there are no flags: CHAT_HISTORY=100 gunicorn ...
app.config.from_prefixed_env("CHAT")

# Not only dots: "." and ".." are path segments that URL normalisation would resolve away.
USER_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")
RETRY_MS = 2000  # sent as `retry:`: how long a client waits before it reconnects
HEARTBEAT = 15.0  # seconds: a quiet stream sends a comment this often, or proxies may cut it
# 1 to 1,000 characters, not all spaces, and no lone surrogate: "\ud800" is valid JSON,
# but not Unicode that Redis could store as UTF-8.
TEXT = re.compile(r"(?=.*\S)[^\ud800-\udfff]{1,1000}", re.DOTALL)
# Control characters (C0, DEL, C1) but newline and tab: a terminal acts on ESC, CR or BEL, so a
# message could rewrite the lines above it, or the window's title.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A Stream id: milliseconds, then a sequence number. At most 19 digits each stays below
# 2**64, Redis's limit, so Redis never refuses one that we pass on.
STREAM_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")


def event(data: str, event_type: str, event_id: str | None = None) -> str:
    """One event: its id and type, a `data:` line for each line of text, and a blank line."""
    fields = [] if event_id is None else [f"id: {event_id}"]
    fields.append(f"event: {event_type}")
    # A line break inside data would end the field: each line of text gets its own `data:`.
    fields += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(fields) + "\n\n"


def message_event(message_id: str, fields: dict) -> str:
    """A stored message as an event; its time is Redis's clock, the first half of its id."""
    data = {"id": message_id, "user": fields["user"], "text": fields["text"]}
    data["time"] = order(message_id)[0] // 1000
    return event(json.dumps(data), "message", message_id)


BROKER_LOCK = threading.Lock()


def broker() -> Broker:
    """This process's Broker, made on first use: under gunicorn, in each worker."""
    with BROKER_LOCK:
        if "chat" not in app.extensions:
            # Redis if REDIS_URL names one, else fakeredis in this process: see rooms.py.
            client = connect(os.environ.get("REDIS_URL"), app.config)
            app.extensions["chat"] = Broker(client, app.config, message_event)
        return app.extensions["chat"]


def event_stream(
    name: str, inbox: queue.Queue, first: list[str], sent: str
) -> Iterator[str | bytes]:
    """Yield the `first` events, then each message the reader queues, until the stream ends."""
    logger.info("%s started: %d events of history first, then new ones", name, len(first))
    try:
        yield f"retry: {RETRY_MS}\n\n"
        yield from first
        after = order(sent)
        while True:
            waiting = take(inbox, HEARTBEAT)  # all that is queued: ONE write for a backlog
            if not waiting:  # a comment: every client ignores it, but the line stays busy
                yield ": keep-alive\n\n"
                continue
            last = waiting.pop() if waiting[-1] in ("overflow", "error") else None
            new = [item for item in waiting if item[0] > after]  # not what the history had
            if new:
                yield b"".join(data for _, _, data in new)
                after, sent = new[-1][:2]
            if last:  # the last one: the client resumes after `sent`
                why = {"last_id": sent} if last == "overflow" else {"error": "Redis is unavailable"}
                yield event(json.dumps(why), last)
                break
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        logger.info("%s ended after event %s; it may resume after it", name, sent)


def last_event_id() -> str | None:
    """Where to resume: after the Last-Event-ID (or ?last_event_id=) a client sends."""
    last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if last_id and not STREAM_ID.fullmatch(last_id):
        abort(400, "Last-Event-ID must be the id of an event this server sent")
    return last_id or None


def checked(room: str) -> str:
    """The room's name, if it follows the rule for user ids; a 400 otherwise."""
    if not USER_ID.fullmatch(room):
        abort(400, "room must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots")
    return room


@app.post("/rooms/<room>/messages")
@limit_posts(app.config, authenticated_user)  # past POSTS: 429, with Retry-After
def post_message(room: str) -> Response:
    """Store a message in the room's history, from where it reaches every subscriber."""
    user, room = authenticated_user(), checked(room)
    text = json_object().get("text")
    if not isinstance(text, str) or not TEXT.fullmatch(text):
        abort(400, "text must be a string of 1 to 1000 characters, not only spaces")
    if CONTROL.search(text):
        abort(400, "text must not contain control characters other than newline and tab")
    # XADD MAXLEN ~ HISTORY: Redis picks the id, and trims whole blocks of old entries, cheaply.
    # A retry with the same Idempotency-Key gets the first post's id, and nothing is stored.
    key = request.headers.get("Idempotency-Key")
    return jsonify(id=broker().post(room, user, text, key)), 201


@app.get("/rooms/<room>/events")
def events(room: str) -> Response:
    """Follow a room: its messages as events, after Last-Event-ID if the client sends one."""
    user, chat = authenticated_user(), broker()
    inbox, gap, kept, sent = chat.subscribe(checked(room), user, last_event_id())
    # A gap is never silent: `reset` says where the history now begins, then comes all of it.
    first = [event(json.dumps(gap), "reset")] if gap else []
    first += [message_event(*message) for message in kept]
    response = sse_response(event_stream(f"{user} in {room}", inbox, first, sent))
    # Called when the server closes the response, even if the client left before the first event.
    response.call_on_close(lambda: chat.unsubscribe(room, inbox))
    return response


@app.get("/rooms/<room>/presence")
def presence(room: str) -> Response:
    """Open streams per user in a room, counted over every process that shares Redis."""
    authenticated_user()
    return jsonify(room=room, users=broker().presence(checked(room)))


def sse_response(body: Iterator[str]) -> Response:
    """The events as one long response that no cache keeps and no proxy holds back."""
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    return Response(body, mimetype="text/event-stream", headers=headers)


@app.get("/")
def index() -> Response:
    """The page that follows a room with fetch(), posts to it, and resumes after a drop."""
    return app.send_static_file("chat.html")


@app.errorhandler(redis.RedisError)
def redis_unavailable(error: redis.RedisError) -> Response:
    """Redis is down or out of reach: 503, and the client tries again later."""
    logger.warning("Redis failed: %s", error)
    return error_as_json(ServiceUnavailable("Redis is unavailable; try again in a moment"))


@app.errorhandler(HTTPException)
def error_as_json(error: HTTPException) -> Response:
    """Answer every HTTP error (400, 404, 405, 500...) as JSON, never as an HTML page."""
    response = error.get_response()
    # The final newline, as jsonify writes it, keeps curl's output off the shell prompt.
    response.set_data(json.dumps({"error": error.description}) + "\n")
    response.content_type = "application/json"
    return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    history = app.config["HISTORY"]
    parser.add_argument("--history", type=int, default=history, help="messages a room keeps")
    args = parser.parse_args()
    if args.history < 1:
        parser.error("--history must be at least 1")
    app.config["HISTORY"] = args.history
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    broker()  # at once: it says whether it serves this process only, or all that share Redis
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even a message's POST) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
