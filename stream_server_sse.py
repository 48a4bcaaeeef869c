"""Step 4: Server-Sent Events, the stream format that browsers (and LLM APIs) speak.

New since step 2: the same personal feed, framed as `text/event-stream`. Each
event is a few `field: value` lines (id, event type, data) ended by a blank line.
A browser reads it with `EventSource`, which reconnects by itself and sends the
last id it saw as `Last-Event-ID`, so the server resumes with no gap and no
duplicate. GET /tokens streams a text word by word, as a chat assistant does, and
GET / serves a page that shows both live.

    python stream_server_sse.py           # then open http://127.0.0.1:5000 in a browser
    python stream_client_sse.py           # or: curl -sN http://127.0.0.1:5000/events/User1
"""

import argparse
import json
import logging
import re
from collections.abc import Callable, Iterator
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


def event(data: str, event_type: str, event_id: int | None = None) -> str:
    """One event: its id and type, a `data:` line for each line of text, and a blank line."""
    fields = [] if event_id is None else [f"id: {event_id}"]
    fields.append(f"event: {event_type}")
    fields += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(fields) + "\n\n"


def pause(seconds: float) -> Iterator[str]:
    """Wait `seconds`, sending a comment line every HEARTBEAT seconds meanwhile."""
    while seconds > HEARTBEAT:
        sleep(HEARTBEAT)
        seconds -= HEARTBEAT
        yield ": keep-alive\n\n"  # a comment: every client ignores it, but the line stays busy
    if seconds:
        sleep(seconds)


def event_stream(
    name: str, text_of: Callable[[int], str], kind: str, total: int, first: int, interval: float
) -> Iterator[str]:
    """Events `first` to `total`, numbered by their id, `interval` seconds apart, then `end`."""
    logger.info("%s started: events %d to %d, %ss apart", name, first, total, interval)
    sent = first - 1
    try:
        yield f"retry: {RETRY_MS}\n\n"
        for number in range(first, total + 1):
            if number > first and interval:
                yield from pause(interval)
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            yield event(text_of(number), kind, number)
            sent = number
        yield event("end of stream", "end")  # so clients know to stop, not to reconnect
        logger.info("%s finished", name)
    except GeneratorExit:  # the server closes the generator when the client has gone
        logger.info("%s: client left after event %d; it may come back for %d", name, sent, sent + 1)
        raise


def first_event() -> int:
    """Where to start: right after the Last-Event-ID that a reconnecting client sends."""
    last_id = request.headers.get("Last-Event-ID", "") or "0"
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


def sse_response(body: Iterator[str]) -> Response:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(body, mimetype="text/event-stream", headers=headers)


@app.get("/events/<user_id>")
def events(user_id: str) -> Response:
    if not USER_ID.fullmatch(user_id):
        abort(400, "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots")
    count = query_number("count", int, 10, 1, MAX_COUNT)
    interval = query_number("interval", float, 1.0, 0, MAX_INTERVAL)
    first = first_event()

    def text_of(number: int) -> str:
        return f"chunk {number} of {count} for {user_id}"

    return sse_response(
        event_stream(f"events for {user_id}", text_of, "chunk", count, first, interval)
    )


@app.get("/tokens")
def tokens() -> Response:
    interval = query_number("interval", float, 0.15, 0, MAX_INTERVAL)
    first = first_event()
    return sse_response(
        event_stream(
            "tokens", lambda number: WORDS[number - 1], "token", len(WORDS), first, interval
        )
    )


@app.get("/")
def page() -> Response:
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
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
