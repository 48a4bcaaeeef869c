"""Step 5: a WebSocket stream the client can steer while it flows.

New since step 3: instead of one HTTP response that only the server writes, a
WebSocket is a two-way channel. The server sends the same personal chunks as
JSON messages, and the client sends commands at any moment (pause, resume,
interval, stop) that change the stream as it runs; the server acknowledges each.
The token from POST /generate_token is checked on the handshake, before the
connection becomes a WebSocket, so a refusal is a plain HTTP 401.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_websocket.py
    python stream_client_websocket.py             # type pause, resume, interval 0.2, stop

Over plain HTTP anyone on the network path can read the tokens: with --cert and
--key it serves HTTPS only (the README shows how to make a local certificate).
"""

import argparse
import json
import logging
import os
import re
import secrets
import select
import socket
from collections import deque
from contextlib import suppress
from time import monotonic, sleep, time

import jwt
from flask import Flask, Response, abort, g, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch
from wsproto.utilities import RemoteProtocolError

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, WRITE_TIMEOUT, RequestHandler, tls_context

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024  # a token request is tiny; a bigger body gets 413
app.config["TOKEN_LIFETIME"] = 15 * 60  # seconds
# A ping every 25 s notices a client that vanished without closing, even while
# the stream is paused and nothing else is sent; messages over 4 KB close it.
app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": 25, "max_message_size": 4096}
sock = Sock(app)

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}
MAX_TOKEN_LENGTH = 1024  # ours are about 250 characters; refuse to parse anything huge
# The JWT header that marks an access token (RFC 9068). Every step that takes tokens
# requires it, so a token minted for another purpose (a refresh token) opens no stream.
ACCESS_TOKEN_TYPE = "at+jwt"
# Seconds of clock difference forgiven in exp and iat: a token minted on a host whose
# clock runs slightly ahead is not "not valid yet" here.
CLOCK_LEEWAY = 10
# Not only dots: "." and ".." are path segments that URL normalisation would resolve away.
USER_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")
REALM = "streams"
# A person types a command every second or two, a script sends a few a second. Twenty
# within one second, or twenty waiting while the client reads none of the answers, is a
# flood: the connection is closed with 1008 (policy violation) before it costs memory.
MAX_COMMANDS = 20


def load_secret_key(required: bool = False) -> bytes:
    """The HS256 signing key, from JWT_SECRET_KEY; never written in code. Called at start
    (here in __main__, under gunicorn by gunicorn.conf.py), never at import."""
    secret = os.environ.get("JWT_SECRET_KEY")
    if secret is None and not required:
        # Random per process: tokens die with it, and another process rejects them.
        logger.warning("JWT_SECRET_KEY is unset: tokens will not survive a restart")
        return secrets.token_bytes(32)
    if secret is None or len(secret.encode()) < 32:
        # HS256 is only as strong as its key: it needs 256 bits (RFC 7518, section 3.2).
        raise SystemExit("JWT_SECRET_KEY must be set to a key of 32 bytes or more (for HS256)")
    return secret.encode()


class Unauthenticated(Exception):
    """No usable credentials: answered with 401 and a Bearer challenge (RFC 6750)."""

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)
        self.description = description  # None when no token was sent at all


def authenticate(body: dict) -> str:
    """Decide which user is asking for a token.

    DEMO ONLY: anyone may claim any user id, as in the tutorial this project
    comes from. In production this is where a real service checks credentials
    (a password against its stored hash, a session, a login at an identity
    provider) and returns the user id that those credentials belong to.
    """
    user_id = body.get("user_id")
    if user_id is None:
        abort(400, "user_id is missing")
    if not isinstance(user_id, str) or not USER_ID.fullmatch(user_id):
        rule = "1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots"
        abort(400, f"user_id must be a string of {rule}")
    return user_id


def json_object() -> dict:
    """The request body as a JSON object, or 415 or 400 saying what is wrong."""
    if not request.is_json:
        abort(415, "send the body as JSON, with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)  # None if it does not parse
    except RecursionError:  # "[" nested a thousand deep: json gives up with this, not ValueError
        body = None
    if not isinstance(body, dict):
        abort(400, 'the body must be a JSON object such as {"user_id": "User1"}')
    return body


@app.post("/generate_token")
def generate_token() -> Response:
    """Mint an access token for the user that authenticate() vouches for."""
    user_id = authenticate(json_object())
    now = int(time())
    lifetime = app.config["TOKEN_LIFETIME"]
    # A JWT is signed, not encrypted: anyone holding it can read these claims,
    # so nothing secret goes in. The signature only proves we wrote them.
    claims = {"sub": user_id, "iat": now, "exp": now + lifetime}
    key, header = app.config["JWT_SECRET_KEY"], {"typ": ACCESS_TOKEN_TYPE}
    token = jwt.encode(claims, key, algorithm="HS256", headers=header)
    logger.info("minted a token for %s", user_id)
    response = jsonify(access_token=token, token_type="Bearer", expires_in=lifetime)
    response.headers["Cache-Control"] = "no-store"  # RFC 6749, 5.1: tokens must not be cached
    return response


TOKEN_PROBLEMS = {  # what went wrong, in words that never quote the token itself
    jwt.ExpiredSignatureError: "the token has expired",
    jwt.ImmatureSignatureError: "the token is not valid yet",
    jwt.MissingRequiredClaimError: "the token lacks a required claim (sub, iat or exp)",
    jwt.InvalidSignatureError: "the token signature does not match",
    jwt.InvalidAlgorithmError: "the token is not signed with HS256",
}
WRONG_TYPE = f"not an access token (its JWT header lacks typ {ACCESS_TOKEN_TYPE})"


def authenticated_user() -> str:
    """The user id of a valid bearer token, checked before any response is started."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("the token is too long")
    try:
        decoded = jwt.decode_complete(  # the header too, for its typ
            token.strip(),
            app.config["JWT_SECRET_KEY"],
            algorithms=["HS256"],  # pinned: never let the token choose (think "alg": "none")
            options={"require": ["exp", "iat", "sub"]},
            leeway=CLOCK_LEEWAY,
        )
    except jwt.PyJWTError as error:  # not just InvalidTokenError: InvalidKeyError is outside it
        problems = [text for kind, text in TOKEN_PROBLEMS.items() if isinstance(error, kind)]
        raise Unauthenticated(problems[0] if problems else "the token is malformed") from None
    if decoded["header"].get("typ") != ACCESS_TOKEN_TYPE:
        raise Unauthenticated(WRONG_TYPE)
    return decoded["payload"]["sub"]


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
    # flask-sock turns the connection into a WebSocket before the view runs, and
    # from then on there is no HTTP status to answer with. So every refusal
    # happens here, while a 401 or 400 is still an ordinary HTTP response.
    if request.endpoint == "stream":
        g.user_id = authenticated_user()
        g.count = query_number("count", int, 20, 1, MAX_COUNT)
        g.interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)


def obey(message: str | bytes, state: dict) -> dict:
    """Apply one client command to the stream's state; return the answer to send back."""
    try:
        command = json.loads(message)
        name = command["command"]
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: "[" nested deep
        return {"type": "error", "error": 'send JSON such as {"command": "pause"}'}
    if name == "pause":
        state["paused"] = True
    elif name == "resume":
        state["paused"] = False
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
        return {
            "type": "error",
            "error": f"unknown command {name!r}: pause, resume, interval, stop",
        }
    return {"type": "ack", "command": name, **state}


class Flooding(Exception):
    """The client sent commands faster than MAX_COMMANDS allows."""


class Channel:
    """One client's WebSocket: its commands read as they arrive, messages sent when it has room."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.arrivals: deque[float] = deque(maxlen=MAX_COMMANDS)  # when the last ones came
        self.waiting: deque = deque()  # commands that came while a message waited for room

    def receive(self, timeout: float | None) -> str | bytes | None:
        """The next command, or None if none came within `timeout` seconds (None: no limit)."""
        return self.waiting.popleft() if self.waiting else self._take(timeout)

    def _take(self, timeout: float | None) -> str | bytes | None:
        message = self.ws.receive(timeout=timeout)
        if message is not None:
            self.arrivals.append(monotonic())
            if len(self.arrivals) == MAX_COMMANDS and self.arrivals[-1] - self.arrivals[0] < 1:
                raise Flooding()
        return message

    def send(self, message: dict) -> None:
        """Send one message as soon as the client has room for it, within WRITE_TIMEOUT."""
        # A client that reads nothing fills the socket's buffers, and ws.send() would block;
        # meanwhile simple-websocket's own thread queues every message that arrives, with no
        # limit and no option to set one. So wait for room here (looking again every 50 ms),
        # taking the commands off that queue as they arrive: Flooding bounds them.
        deadline = monotonic() + WRITE_TIMEOUT
        while not self.has_room():
            if monotonic() > deadline:  # it accepts nothing more: end it, as if it had gone
                raise TimeoutError(f"the client accepted no data for {WRITE_TIMEOUT} s")
            if (command := self._take(timeout=0.05)) is not None:
                self.waiting.append(command)
                if len(self.waiting) >= MAX_COMMANDS:
                    raise Flooding()
        self.ws.send(json.dumps(message))

    def has_room(self) -> bool:
        """Whether the socket takes another message at once, without blocking."""
        try:
            return bool(select.select([], [self.ws.sock], [], 0)[1])
        except ValueError:  # simple-websocket closed the socket: let ws.send() say so
            return True

    def close_for_flooding(self) -> None:
        """Close with 1008 if the closing message fits, and read nothing more either way."""
        with suppress(ConnectionClosed, OSError):  # unless the client has gone already
            if self.has_room():  # 1008: policy violation (RFC 6455, 7.4.1)
                self.ws.close(reason=1008, message=f"more than {MAX_COMMANDS} commands at once")
            # Then stop reading whatever else it sends. With no room, not even the closing
            # message can go: this alone ends the connection.
            self.ws.sock.shutdown(socket.SHUT_RDWR)


@sock.route("/ws")
def stream(ws) -> None:
    """Stream the user's chunks as JSON messages, obeying the client's commands as they come."""
    user_id, count = g.user_id, g.count
    state = {"paused": False, "stopped": False, "interval": g.interval}
    channel = Channel(ws)
    logger.info("stream started for %s: %d chunks", user_id, count)
    sent, next_chunk_at = 0, monotonic()
    try:
        while sent < count and not state["stopped"]:
            # Wait for a command until the next chunk is due (forever while paused):
            # one loop both reads what the client says and keeps the stream's pace.
            timeout = None if state["paused"] else max(0.0, next_chunk_at - monotonic())
            message = channel.receive(timeout)
            if message is not None:
                channel.send(obey(message, state))
                continue
            sent += 1
            if not state["interval"] and sent % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            text = f"chunk {sent} of {count} for {user_id}"
            channel.send({"type": "chunk", "number": sent, "text": text})
            next_chunk_at = monotonic() + state["interval"]
        channel.send({"type": "end", "sent": sent})
        logger.info("stream finished for %s: %d of %d chunks sent", user_id, sent, count)
    # The client closed, or vanished and a send or ping failed (ConnectionClosed), or it
    # reset the connection before simple-websocket noticed, or accepted nothing for
    # WRITE_TIMEOUT (OSError, from the socket; TimeoutError is one).
    except (ConnectionClosed, OSError):
        logger.info("%s disconnected after %d of %d chunks", user_id, sent, count)
    except Flooding:
        logger.info("%s sent too many commands: closed after %d chunks", user_id, sent)
        channel.close_for_flooding()


@app.errorhandler(Unauthenticated)
def ask_for_a_token(error: Unauthenticated) -> Response:
    challenge = f'Bearer realm="{REALM}"'
    if error.description is None:  # no token at all: RFC 6750 says no error code then
        body = {"error": "send 'Authorization: Bearer <token>'; POST /generate_token mints one"}
    else:
        challenge += f', error="invalid_token", error_description="{error.description}"'
        body = {"error": "invalid_token", "error_description": error.description}
        logger.info("refused a connection: %s", error.description)
    response = jsonify(body)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = challenge
    return response


@app.errorhandler(RemoteProtocolError)
def bad_handshake(error: RemoteProtocolError) -> Response:
    # wsproto, under simple-websocket, checks the upgrade request and says what to answer:
    # 400 when Sec-WebSocket-Key is missing, 426 and the version it speaks for another one.
    hint = error.event_hint
    problem = "Sec-WebSocket-Version must be 13" if hint.status_code == 426 else error
    response = jsonify(error=f"not a WebSocket handshake this server takes: {problem}")
    response.status_code = hint.status_code
    response.headers.extend((name.decode(), value.decode()) for name, value in hint.headers)
    return response


@app.errorhandler(WebsocketMismatch)
def wrong_protocol(error: WebsocketMismatch) -> tuple[Response, int]:
    return jsonify(error="/ws takes WebSocket connections only; the other routes, plain HTTP"), 400


@app.errorhandler(HTTPException)
def error_as_json(error: HTTPException) -> Response:
    """Answer every HTTP error (400, 404, 405, 413, 415, 500...) as JSON, never as an HTML page."""
    response = error.get_response()
    # The final newline, as jsonify writes it, keeps curl's output off the shell prompt.
    response.set_data(json.dumps({"error": error.description}) + "\n")
    response.content_type = "application/json"
    return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    parser.add_argument("--cert", help="certificate file (PEM): serve HTTPS only, with --key")
    parser.add_argument("--key", help="the certificate's private key file (PEM)")
    args = parser.parse_args()
    try:
        context = tls_context(args.cert, args.key)  # None without them: plain HTTP
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    # One thread per WebSocket.
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        ssl_context=context,
        request_handler=RequestHandler,
    )
