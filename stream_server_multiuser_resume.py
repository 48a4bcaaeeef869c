"""Step 7: a stream that ends when its access token expires, and resumes where it stopped.

New since step 6: a stream lasts no longer than the access token that opened it.
It cannot answer 401 then (its status line went out long ago), so every line is a
JSON object (NDJSON) and the last one says how the stream ended: complete, or
token_expired with the number of the next line. GET /stream?from=N resumes there,
with no gap and no duplicate, once the client has renewed its tokens.

Run it, then follow one long stream across refreshes from a second terminal:

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_multiuser_resume.py --access-lifetime 5
    python stream_client_multiuser_resume.py --count 14 --interval 1

Over plain HTTP anyone on the network path can read the tokens: with --cert and
--key it serves HTTPS only (the README shows how to make a local certificate).
"""

import argparse
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from time import sleep, time

from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException

# This step's lesson, the refresh tokens and the ledger of used ones: see refresh_tokens.py.
from refresh_tokens import ACCESS_LIFETIME, REFRESH_LIFETIME, ledger, refresh_tokens

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler, tls_context

# Step 3's lesson, shared with every later step that takes tokens: see tokens.py.
from tokens import access_claims, authenticated_user, load_secret_key

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024  # a token request is tiny; a bigger body gets 413

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}


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
# Step 3's blueprint gives way to this one: POST /generate_token mints a pair, POST
# /refresh_token renews it, and every bad token still gets step 3's 401.
app.register_blueprint(refresh_tokens)


def line(**fields) -> str:
    """One line of NDJSON: a JSON object, then a line break."""
    return json.dumps(fields) + "\n"


def generate_chunks(
    user_id: str, count: int, interval: float, first: int, expires: int
) -> Iterator[str]:
    """Yield lines `first` to `count` for `user_id`, then one that says how the stream ended."""
    # The generator runs after the view has returned, when Flask's request context
    # is gone: touching `request` here would raise. So the view reads everything it
    # needs and passes plain values in (flask.stream_with_context is the other way).
    tracker.start(user_id)
    logger.info("stream started for %s: lines %d to %d, %ss apart", user_id, first, count, interval)
    delivered = first - 1
    try:
        for number in range(first, count + 1):
            if number > first and interval:
                sleep(max(0.0, min(interval, expires - time())))  # wake when the token expires
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            if time() >= expires:
                # The status line said 200 long ago and cannot change: the last line says why.
                logger.info("token of %s expired: stream stopped before line %d", user_id, number)
                yield line(end="token_expired", next=number)
                return
            yield line(seq=number, text=f"chunk {number} of {count} for {user_id}")
            # Execution only comes back here once the server has written the chunk.
            delivered = number
        yield line(end="complete")  # a stream that ends without this line was cut off
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        if delivered == count:
            logger.info("stream finished for %s: %d chunks sent", user_id, count)
        elif time() < expires:  # an expired token has said so already
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


@app.get("/stream")
def stream() -> Response:
    """Stream lines `from` to `count` for the token's user, until the token expires."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    # No user in the URL: the token says who is asking, so a token can only
    # ever stream its own user's data. Checked here, before the first chunk:
    # once streaming has begun, the status can no longer become 401.
    claims = access_claims()  # step 3's check, keeping the token's exp: the stream ends there
    count = query_number("count", int, 100, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    first = query_number("from", int, 1, 1, MAX_COUNT)
    if first > count:  # a client that asks for more than there is has lost count: say so
        abort(400, f"from must be at most count ({count}): there is no line {first}")
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    body = generate_chunks(claims["sub"], count, interval, first, claims["exp"])
    return Response(body, mimetype="application/x-ndjson", headers=headers)


@app.get("/status")
def status() -> Response:
    """Open streams per user (users with none left out) and streams served so far."""
    authenticated_user()  # for callers with a valid token (a real service: operators only)
    return jsonify(tracker.snapshot())


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    example = f"curl -sN -H 'Authorization: Bearer <token>' '{request.host_url}stream?count=5'"
    note = (
        "POST /generate_token mints a pair of tokens; POST /refresh_token renews it, once;\n"
        "GET /stream?count=N&interval=SECONDS&from=LINE with the access token streams lines\n"
        "LINE to N for its user, as JSON, until the token expires.\n"
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
    parser.add_argument("--access-lifetime", type=int, default=ACCESS_LIFETIME, help="seconds")
    parser.add_argument("--refresh-lifetime", type=int, default=REFRESH_LIFETIME, help="seconds")
    parser.add_argument("--cert", help="certificate file (PEM): serve HTTPS only, with --key")
    parser.add_argument("--key", help="the certificate's private key file (PEM)")
    args = parser.parse_args()
    if not 1 <= args.access_lifetime < args.refresh_lifetime:
        parser.error("lifetimes: at least 1 second, and the refresh token's the longer")
    try:
        context = tls_context(args.cert, args.key)  # None without them: plain HTTP
    except ValueError as error:
        parser.error(str(error))
    app.config.update(ACCESS_LIFETIME=args.access_lifetime, REFRESH_LIFETIME=args.refresh_lifetime)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even GET /status) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    try:
        # Here, once: under gunicorn, each worker opens the ledger at its first refresh.
        ledger.open(os.environ.get("REDIS_URL"))
    except ValueError as error:  # redis-py explains a malformed URL
        parser.error(f"REDIS_URL: {error}")
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        ssl_context=context,
        request_handler=RequestHandler,
    )
