"""Step 1: stream one response with HTTP/1.1 chunked transfer encoding.

A Flask view returns a generator instead of a string. Werkzeug sends each item
the generator yields as one HTTP chunk the moment it is produced, so the client
sees the first line long before the last one exists.

Run it, then stream from it in a second terminal:

    python stream_server.py                  # serves http://127.0.0.1:5000
    python stream_client.py                  # or: curl -sN --raw "http://127.0.0.1:5000/stream?count=3"
"""

import argparse
import json
import logging
import re
from collections.abc import Iterator
from time import sleep

from flask import Flask, Response, abort, request
from werkzeug.exceptions import HTTPException

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler

logger = logging.getLogger(__name__)
app = Flask(__name__)

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}


def generate_chunks(count: int, interval: float) -> Iterator[str]:
    """Yield `count` lines, the first at once, then one every `interval` seconds."""
    logger.info("stream started: %d chunks, %ss apart", count, interval)
    delivered = 0
    try:
        for number in range(1, count + 1):
            # No pause before the first chunk, nor at interval=0: even sleep(0) costs
            # a system call and a thread switch per chunk: about 5 times fewer chunks/s.
            if number > 1 and interval:
                sleep(interval)
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            yield f"chunk {number} of {count}\n"
            # Execution only comes back here once the server has written the chunk.
            delivered = number
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        if delivered == count:
            logger.info("stream finished: %d chunks sent", count)
        else:
            logger.info("client disconnected after %d of %d chunks", delivered, count)


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


@app.get("/stream")
def stream() -> Response:
    """Stream `count` lines, each sent as one chunk the moment it is made."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    count = query_number("count", int, 10, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    return Response(generate_chunks(count, interval), mimetype="text/plain", headers=headers)


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    example = f"curl -sN --raw '{request.host_url}stream?count=5&interval=1'"
    note = f"GET /stream?count=N&interval=SECONDS streams N lines.\nTry: {example}\n"
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
    # threaded=True is Flask's default, written out because streaming depends on it:
    # Werkzeug only speaks HTTP/1.1, and so only sends Transfer-Encoding: chunked,
    # when threads or processes are enabled. Without them it answers HTTP/1.0 and
    # the stream ends with a closed connection instead of chunk framing.
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
