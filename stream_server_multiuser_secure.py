"""Step 3: the multi-user stream behind JWT authentication.

New since step 2: POST /generate_token mints a signed token for a user, and
GET /stream streams only to a caller whose `Authorization: Bearer <token>`
checks out, always the stream of the user the token names. Every refusal is a
401 that says why (RFC 6750), sent before any stream data.

Run it, then mint a token and stream with it from a second terminal:

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_multiuser_secure.py
    python stream_client_multiuser_secure.py      # mints a token for User1 and streams

Over plain HTTP anyone on the network path can read the tokens: with --cert and
--key it serves HTTPS only (the README shows how to make a local certificate).
"""

import argparse
import json
import logging
import os
import re
import secrets
import threading
from collections import Counter
from collections.abc import Iterator
from time import sleep, time

import jwt
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler, tls_context

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024  # a token request is tiny; a bigger body gets 413
app.config["TOKEN_LIFETIME"] = 15 * 60  # seconds

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


def generate_chunks(user_id: str, count: int, interval: float) -> Iterator[str]:
    """Yield `count` lines for `user_id`, the first at once, then one every `interval` seconds."""
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
            delivered = number
    finally:
        if delivered == count:
            logger.info("stream finished for %s: %d chunks sent", user_id, count)
        else:
            logger.info("%s disconnected after %d of %d chunks", user_id, delivered, count)
        tracker.stop(user_id)


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
    # No user in the URL: the token says who is asking, so a token can only
    # ever stream its own user's data. Checked here, before the first chunk:
    # once streaming has begun, the status can no longer become 401.
    user_id = authenticated_user()
    count = query_number("count", int, 10, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    body = generate_chunks(user_id, count, interval)
    return Response(body, mimetype="text/plain", headers=headers)


@app.get("/status")
def status() -> Response:
    """Who is streaming, for callers with a valid token (a real service: operators only)."""
    authenticated_user()
    return jsonify(tracker.snapshot())


@app.errorhandler(Unauthenticated)
def ask_for_a_token(error: Unauthenticated) -> Response:
    challenge = f'Bearer realm="{REALM}"'
    if error.description is None:  # no token at all: RFC 6750 says no error code then
        body = {"error": "send 'Authorization: Bearer <token>'; POST /generate_token mints one"}
    else:
        challenge += f', error="invalid_token", error_description="{error.description}"'
        body = {"error": "invalid_token", "error_description": error.description}
        logger.info("refused a request: %s", error.description)
    response = jsonify(body)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = challenge
    return response


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
    parser.add_argument("--token-lifetime", type=int, default=15 * 60, help="seconds a token lasts")
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
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        ssl_context=context,
        request_handler=RequestHandler,
    )
