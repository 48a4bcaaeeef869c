"""Step 4: Server-Sent Events, the stream format that browsers (and LLM APIs) speak.

New since step 2: the same personal feed, framed as `text/event-stream`. Each
event is a few `field: value` lines (id, event type, data) ended by a blank line.
A browser reads it with `EventSource`, which reconnects by itself and sends the
last id it saw as `Last-Event-ID`, so the server resumes with no gap and no
duplicate. GET /tokens streams a text word by word, as a chat assistant does,
GET / serves a page that shows both live, and GET /status counts the streams.

Run it, then follow a feed from a second terminal, or open the page in a browser:

    python stream_server_sse.py           # serves http://127.0.0.1:5000 (the page)
    python stream_client_sse.py           # or: curl -sN http://127.0.0.1:5000/events/User1
"""

import argparse
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from time import sleep

from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler

logger = logging.getLogger(__name__)
app = Flask(__name__)

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}
# Not only dots: "." and ".." are path segments that URL normalisation would resolve away.
USER_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")
RETRY_MS = 2000  # sent as `retry:`: how long a client waits before it reconnects
HEARTBEAT = 15.0  # seconds: a quiet stream sends a comment this often, or proxies may cut it
WORDS = re.findall(
    r"\s*\S+",  # each word with the space before it, as a text generator emits tokens
    "Server-Sent Events carry text from a server to a browser over one long HTTP response. "
    "Every event is on its way the moment it is written, which is how chat assistants show "
    "their answers word by word.",
)


class StreamTracker:
    """Counts open streams per user. Every request runs in its own thread, so a lock guards it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()
        self._served = 0

    def start(self, user_id: str) -> None:
        with self._lock:
            self._active[user_id] += 1
            self._served += 1

    def stop(self, user_id: str) -> None:
        with self._lock:
            self._active[user_id] -= 1
            if not self._active[user_id]:
                del self._active[user_id]

    def snapshot(self) -> dict:
        with self._lock:
            # Each process counts only its own streams: under gunicorn with several
            # workers, the pid says which worker these numbers belong to.
            return {"active": dict(self._active), "served": self._served, "pid": os.getpid()}


tracker = StreamTracker()


def event(data: str, event_type: str, event_id: int | None = None) -> str:
    """One event: its id and type, a `data:` line for each line of text, and a blank line."""
    fields = [] if event_id is None else [f"id: {event_id}"]
    fields.append(f"event: {event_type}")
    # A line break inside data would end the field: each line of text gets its own `data:`.
    fields += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(fields) + "\n\n"


def pause(seconds: float) -> Iterator[str]:
    """Wait `seconds`, sending a comment line every HEARTBEAT seconds meanwhile."""
    while seconds > HEARTBEAT:
        sleep(HEARTBEAT)
        seconds -= HEARTBEAT
        yield ": keep-alive\n\n"  # a comment: every client ignores it, but the line stays busy
    sleep(seconds)


def event_stream(
    name: str, text_of: Callable[[int], str], kind: str, count: int, first: int, interval: float
) -> Iterator[str]:
    """Yield events `first` to `count` of type `kind`, `interval` seconds apart, then `end`."""
    # The generator runs after the view has returned, when Flask's request context
    # is gone: touching `request` here would raise. So the view reads everything it
    # needs and passes plain values in (flask.stream_with_context is the other way).
    tracker.start(name)  # /status counts streams by name: "events for User1", "tokens"
    logger.info("%s started: events %d to %d, %ss apart", name, first, count, interval)
    delivered = first - 1
    try:
        yield f"retry: {RETRY_MS}\n\n"
        for number in range(first, count + 1):
            if number > first and interval:
                yield from pause(interval)
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            # The event's number is its id: the Last-Event-ID that a client resumes from.
            yield event(text_of(number), kind, number)
            # Execution only comes back here once the server has written the chunk.
            delivered = number
        yield event("end of stream", "end")  # so clients know to stop, not to reconnect
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        if delivered == count:
            logger.info("%s finished: events %d to %d sent", name, first, count)
        else:
            logger.info("%s: client left after event %d; it may resume", name, delivered)
        tracker.stop(name)  # without it, a user who left would count as streaming forever


def first_event() -> int:
    """Where to start: right after the Last-Event-ID (or ?last_event_id=) a client sends."""
    # A client that cannot set the header sends the query: a page whose EventSource gave up.
    last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    # Read here, in the view: a bad id still gets its 400 before the stream begins.
    if not (last_id.isascii() and last_id.isdigit() and len(last_id) <= 7):
        abort(400, "Last-Event-ID must be the id of an event this server sent")
    return int(last_id) + 1


def query_number(name: str, convert: type, default: float, low: float, high: float):
    """Read one number from the query string, or answer 400 saying what is wrong."""
    raw = request.args.get(name)
    if raw is None:
        return default
    # Plain ASCII digits only: int() and float() also take Arabic-Indic and full-width
    # digits, " 5 ", "+5", "1_000", "nan" and "1e3", which no client means to send.
    value = convert(raw) if NUMBER[convert].fullmatch(raw) else None
    if value is None or not low <= value <= high:
        kind = "a whole number" if convert is int else "a number"
        abort(400, f"{name} must be {kind} from {low} to {high}, got {raw!r}")
    return value


@app.get("/events/<user_id>")
def stream(user_id: str) -> Response:
    """Stream the personal feed of `user_id`: `count` items, `interval` seconds apart."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    if not USER_ID.fullmatch(user_id):
        abort(400, "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots")
    count = query_number("count", int, 10, 1, MAX_COUNT)
    interval = query_number("interval", float, 1.0, 0, MAX_INTERVAL)

    def text_of(number: int) -> str:
        return f"chunk {number} of {count} for {user_id}"

    name = f"events for {user_id}"
    return sse_response(event_stream(name, text_of, "chunk", count, first_event(), interval))


@app.get("/tokens")
def tokens() -> Response:
    """A text, one word per `token` event, the way a chat assistant streams its answer."""
    interval = query_number("interval", float, 0.15, 0, MAX_INTERVAL)
    text_of, count = lambda number: WORDS[number - 1], len(WORDS)
    return sse_response(event_stream("tokens", text_of, "token", count, first_event(), interval))


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


@app.get("/status")
def status() -> Response:
    """Open streams per user (users with none left out) and streams served so far."""
    return jsonify(tracker.snapshot())


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    return app.send_static_file("sse.html")


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even GET /status) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
