"""Step 5: a WebSocket stream the client can steer while it flows.

New since step 3: GET /ws is a WebSocket, a channel both ways: JSON chunks from the
server, commands from the client (pause, resume, interval, stop) at any moment. The
token is checked before the upgrade to a WebSocket, so every refusal is a
401 that says why (RFC 6750), sent before any stream data.

Run it, then mint a token and stream with it from a second terminal:

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_websocket.py
    python stream_client_websocket.py     # mints a token for User1; type pause, resume, stop

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
from time import monotonic, sleep

from flask import Flask, Response, abort, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from werkzeug.exceptions import HTTPException

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler, tls_context
from serving_websocket import Channel, Flooding, handshakes  # and what a WebSocket needs

# Step 3's lesson, shared with every later step that takes tokens: see tokens.py.
from tokens import TOKEN_LIFETIME, authenticated_user, load_secret_key, tokens

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024  # a token request is tiny; a bigger body gets 413
# A ping every 25 s notices a client that vanished without closing, even while
# the stream is paused and nothing else is sent; messages over 4 KB close it.
app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25, "max_message_size": 4096}
sock = Sock(app)

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
app.register_blueprint(tokens)  # POST /generate_token, and a 401 for every bad token
app.register_blueprint(handshakes)  # a 400 or 426 that says why, for a bad handshake


def obey(message: str | bytes, state: dict) -> dict:
    """Apply one client command to the stream's state; return the answer to send back."""
    try:
        command = json.loads(message)
        name = command["command"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: "[" nested deep
        return {"type": "error", "error": 'send JSON such as {"command": "pause"}'}
    if name in ("pause", "resume"):
        state["paused"] = name == "pause"
    elif name == "stop":
        state["stopped"] = True
    elif name == "interval":
        seconds = command.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return {"type": "error", "error": "interval needs seconds, a number"}
        if not 0 <= seconds <= MAX_INTERVAL:
            return {"type": "error", "error": f"seconds must be from 0 to {MAX_INTERVAL}"}
        state["interval"] = seconds
    else:
        known = "pause, resume, interval, stop"
        return {"type": "error", "error": f"unknown command {name!r}: {known}"}
    return {"type": "ack", "command": name, **state}


@sock.route("/ws")
def stream(ws, user_id: str, count: int, interval: float) -> None:
    """Send `count` chunks for `user_id` as JSON messages, obeying the client's commands."""
    # A WebSocket is not returned but written to, by this view, as long as the stream runs.
    channel, due = Channel(ws), monotonic()
    state = {"paused": False, "stopped": False, "interval": interval}
    tracker.start(user_id)
    logger.info("stream started for %s: %d chunks, %ss apart", user_id, count, interval)
    delivered = 0
    try:
        for number in range(1, count + 1):
            # Until the chunk is due (forever while paused), listen for commands instead of
            # sleeping: one loop both hears the client and keeps the stream's pace.
            while not state["stopped"]:
                timeout = None if state["paused"] else max(0.0, due - monotonic())
                if (command := channel.receive(timeout)) is None:
                    break  # none came in time: the chunk is due
                channel.send(obey(command, state))
            if state["stopped"]:
                break
            elif number % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            text = f"chunk {number} of {count} for {user_id}"
            channel.send({"type": "chunk", "number": number, "text": text})
            # Execution only comes back here once the server has written the chunk.
            delivered = number
            due = monotonic() + state["interval"]
        channel.send({"type": "end", "sent": delivered})
    # Gone: it closed or vanished (ConnectionClosed), or it reset the connection or accepted
    # nothing for WRITE_TIMEOUT (OSError, from the socket; TimeoutError is one).
    except (ConnectionClosed, OSError):
        pass
    except Flooding:
        logger.info("%s sent too many commands: closed after %d chunks", user_id, delivered)
        channel.close_for_flooding()
    finally:
        if delivered == count:
            logger.info("stream finished for %s: %d chunks sent", user_id, count)
        elif state["stopped"]:
            logger.info("%s stopped the stream after %d of %d chunks", user_id, delivered, count)
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


@app.before_request
def check_before_the_handshake() -> None:
    """Refuse a bad /ws request with a 401 or 400 while it is still plain HTTP."""
    # flask-sock makes the connection a WebSocket before the view runs, and from then
    # on there is no HTTP status to answer with: so the view's checks come first, here.
    if request.endpoint != "stream":
        return
    # No user in the URL: the token says who is asking, so a token can only
    # ever stream its own user's data. Checked here, before the first chunk:
    # once streaming has begun, the status can no longer become 401.
    user_id = authenticated_user()
    count = query_number("count", int, 20, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    # Handed to the view as its arguments, as if they had come in the URL.
    request.view_args.update(user_id=user_id, count=count, interval=interval)


@app.get("/status")
def status() -> Response:
    """Open streams per user (users with none left out) and streams served so far."""
    authenticated_user()  # for callers with a valid token (a real service: operators only)
    return jsonify(tracker.snapshot())


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    example = f"python stream_client_websocket.py --url {request.host_url.rstrip('/')}"
    note = (
        "POST /generate_token mints a token; GET /ws?count=N&interval=SECONDS with it is\n"
        f"a WebSocket you can steer; GET /status shows who is streaming.\nTry: {example}\n"
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
    parser.add_argument("--token-lifetime", type=int, default=TOKEN_LIFETIME, help="seconds")
    parser.add_argument("--cert", help="certificate file (PEM): serve HTTPS only, with --key")
    parser.add_argument("--key", help="the certificate's private key file (PEM)")
    args = parser.parse_args()
    if args.token_lifetime < 1:
        parser.error("--token-lifetime must be at least 1 second")
    try:
        context = tls_context(args.cert, args.key)  # None without them: plain HTTP
    except ValueError as error:
        parser.error(str(error))
    app.config["TOKEN_LIFETIME"] = args.token_lifetime
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even GET /status) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        ssl_context=context,
        request_handler=RequestHandler,
    )
