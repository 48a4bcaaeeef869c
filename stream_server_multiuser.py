"""Step 2: many users streaming at once, each with a personal stream.

New since step 1: the user id in the URL personalises every line, several
streams run at the same time (one thread each), and the server keeps track of
who is streaming right now at GET /status.

Run it, then stream three users at once from a second terminal:

    python stream_server_multiuser.py        # serves http://127.0.0.1:5000
    python stream_client_multiuser.py        # or: curl -sN http://127.0.0.1:5000/stream/User1
"""

import argparse
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
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


def generate_chunks(user_id: str, count: int, interval: float) -> Iterator[str]:
    """Yield `count` lines for `user_id`, the first at once, then one every `interval` seconds."""
    # The generator runs after the view has returned, when Flask's request context
    # is gone: touching `request` here would raise. So the view reads everything it
    # needs and passes plain values in (flask.stream_with_context is the other way).
    tracker.start(user_id)
    logger.info("stream started for %s: %d chunks, %ss apart", user_id, count, interval)
    delivered = 0
    try:
        for number in range(1, count + 1):
            if number > 1 and interval:
                sleep(interval)
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            yield f"chunk {number} of {count} for {user_id}\n"
            # Execution only comes back here once the server has written the chunk.
            delivered = number
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        if delivered == count:
            logger.info("stream finished for %s: %d chunks sent", user_id, count)
        else:
            logger.info("%s disconnected after %d of %d chunks", user_id, delivered, count)
        tracker.stop(user_id)  # without it, a user who left would count as streaming forever


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


@app.get("/stream/<user_id>")
def stream(user_id: str) -> Response:
    """Stream the personal feed of `user_id`: `count` items, `interval` seconds apart."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    if not USER_ID.fullmatch(user_id):
        abort(400, "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots")
    count = query_number("count", int, 10, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    body = generate_chunks(user_id, count, interval)
    return Response(body, mimetype="text/plain", headers=headers)


@app.get("/status")
def status() -> Response:
    """Open streams per user (users with none left out) and streams served so far."""
    return jsonify(tracker.snapshot())


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    example = f"curl -sN '{request.host_url}stream/User1?count=5&interval=1'"
    note = (
        "GET /stream/<user_id>?count=N&interval=SECONDS streams N lines for one user.\n"
        f"GET /status shows who is streaming.\nTry: {example}\n"
    )
    return Response(note, mimetype="text/plain")


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
