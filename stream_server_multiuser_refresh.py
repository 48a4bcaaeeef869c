"""Step 6: long-lived secure streams: short access tokens, refresh tokens, resume, HTTPS.

New since step 3: minting returns two tokens. The access token opens streams and
lasts a minute; the refresh token lasts an hour and can only buy a new pair, once,
at POST /refresh_token; the reuse of one revokes its whole login. A stream stops
the moment its access token expires, with a last line that says so and where to
go on; the client refreshes its tokens and resumes with GET /stream?from=N, with
no gap and no duplicate. Every line is a JSON object that carries its sequence number.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_multiuser_refresh.py --cert certs/server.pem --key certs/server.key
    python stream_client_multiuser_refresh.py --url https://localhost:5000 --cacert certs/client.pem

With REDIS_URL set (such as redis://127.0.0.1:6379/0), the used refresh tokens and
revoked logins are kept in Redis, where every worker and host sees them.
"""

import argparse
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from time import sleep, time

import jwt
import redis
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException, ServiceUnavailable

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import TURN, RequestHandler, tls_context

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024
app.config["ACCESS_LIFETIME"] = 60  # seconds: short, so a stolen access token soon stops working
app.config["REFRESH_LIFETIME"] = 60 * 60

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}
MAX_TOKEN_LENGTH = 1024
# The JWT header that marks an access token (RFC 9068). Every step that takes tokens
# requires it, so a token minted for another purpose (a refresh token) opens no stream.
ACCESS_TOKEN_TYPE = "at+jwt"
# A refresh token's own mark: no step takes it for an access token, nor an access token for it.
REFRESH_TOKEN_TYPE = "refresh+jwt"
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


class RefreshTokenLedger:
    """The refresh tokens already used and the logins revoked, each kept until it would
    expire anyway. In this process's memory; with REDIS_URL, in Redis, which every worker
    and host shares and which outlives a restart of the server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[str, int] = {}  # key -> when it expires
        self._redis: redis.Redis | None = None
        self._opened = False

    def open(self, redis_url: str | None) -> None:
        """Choose where the ledger lives, and say so: at start in __main__; under gunicorn
        on first use, in the worker, so that no worker shares another's connection."""
        if redis_url:
            self._redis = redis.Redis.from_url(redis_url)  # it connects when first used
            try:
                self._redis.ping()
                logger.info("REDIS_URL is set: used refresh tokens are kept in Redis")
            except redis.RedisError as error:  # not fatal: refreshes get 503 until it answers
                logger.warning("REDIS_URL is set, but Redis does not answer (%s): "
                               "refreshes fail with 503 until it does", error)
        else:
            # Every process keeps its own: a token used in one worker works once more in
            # each other worker, and once more after a restart.
            logger.warning("REDIS_URL is unset: reuse is detected within this process only")
        self._opened = True

    def _store(self) -> redis.Redis | None:
        with self._lock:
            if not self._opened:
                self.open(os.environ.get("REDIS_URL"))
        return self._redis

    def has(self, key: str) -> bool:
        """Whether `key` is remembered. (Any RedisError becomes a 503.)"""
        if (store := self._store()) is not None:
            return bool(store.exists(key))
        with self._lock:
            return self._memory.get(key, 0) > time()

    def add(self, key: str, expires: int) -> bool:
        """Remember `key` until `expires`; False if it was there already."""
        if (store := self._store()) is not None:
            # SET NX EX: stored only if absent, with its expiry, in one atomic step, so
            # of two workers that try at once, exactly one succeeds.
            return bool(store.set(key, 1, nx=True, ex=max(1, expires - int(time()))))
        with self._lock:
            self._memory = {name: exp for name, exp in self._memory.items() if exp > time()}
            if key in self._memory:
                return False
            self._memory[key] = expires
            return True


ledger = RefreshTokenLedger()


class Unauthenticated(Exception):
    """No usable credentials: answered with 401 and a Bearer challenge (RFC 6750)."""

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)
        self.description = description


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


def json_field(name: str) -> str:
    """A string field of the JSON object in the request body, or 400."""
    value = json_object().get(name)
    if not isinstance(value, str):
        abort(400, f'send a JSON object with a string "{name}"')
    return value


def token_pair(user_id: str, family: str) -> Response:
    """A new access token and a new refresh token; the JWT header's typ tells them apart."""
    now, key = int(time()), app.config["JWT_SECRET_KEY"]
    access, refresh = app.config["ACCESS_LIFETIME"], app.config["REFRESH_LIFETIME"]
    claims = {"sub": user_id, "iat": now}
    access_claims = {**claims, "exp": now + access}
    # jti, a unique id, is what the ledger remembers once the token has been used;
    # family, the login the token descends from, is what the reuse of any member revokes.
    refresh_claims = {
        **claims,
        "exp": now + refresh,
        "jti": secrets.token_hex(16),
        "family": family,
    }
    response = jsonify(
        access_token=jwt.encode(
            access_claims, key, algorithm="HS256", headers={"typ": ACCESS_TOKEN_TYPE}
        ),
        refresh_token=jwt.encode(
            refresh_claims, key, algorithm="HS256", headers={"typ": REFRESH_TOKEN_TYPE}
        ),
        token_type="Bearer",
        expires_in=access,
        refresh_expires_in=refresh,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@app.post("/generate_token")
def generate_token() -> Response:
    """Mint a pair for any user id: a stand-in for a real login (see step 3)."""
    user_id = json_field("user_id")
    if not USER_ID.fullmatch(user_id):
        abort(400, "user_id must be 1 to 64 characters of A-Z a-z 0-9 _ . -, not only dots")
    # A login starts a new family: every refresh token it leads to carries its id.
    return token_pair(user_id, family=secrets.token_hex(16))


TOKEN_PROBLEMS = {  # what went wrong, in words that never quote the token itself
    jwt.ExpiredSignatureError: "the token has expired",
    jwt.ImmatureSignatureError: "the token is not valid yet",
    jwt.MissingRequiredClaimError: "the token lacks a required claim (sub, iat or exp)",
    jwt.InvalidSignatureError: "the token signature does not match",
    jwt.InvalidAlgorithmError: "the token is not signed with HS256",
}
WRONG_TYPE = f"not an access token (its JWT header lacks typ {ACCESS_TOKEN_TYPE})"
NOT_REFRESHABLE = f"not a refresh token (its JWT header lacks typ {REFRESH_TOKEN_TYPE})"


def verify(token: str, typ: str) -> dict:
    """The claims of a valid token whose JWT header says it is of type `typ`."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("the token is too long")
    try:
        decoded = jwt.decode_complete(  # the header too, for its typ
            token,
            app.config["JWT_SECRET_KEY"],
            algorithms=["HS256"],
            options={"require": ["exp", "iat", "sub"]},
            leeway=CLOCK_LEEWAY,
        )
    except jwt.PyJWTError as error:
        problems = [text for kind, text in TOKEN_PROBLEMS.items() if isinstance(error, kind)]
        raise Unauthenticated(problems[0] if problems else "the token is malformed") from None
    if decoded["header"].get("typ") != typ:
        raise Unauthenticated(WRONG_TYPE if typ == ACCESS_TOKEN_TYPE else NOT_REFRESHABLE)
    return decoded["payload"]


@app.post("/refresh_token")
def refresh_token() -> Response:
    """Trade a refresh token, once, for a new pair of the same login."""
    claims = verify(json_field("refresh_token"), REFRESH_TOKEN_TYPE)
    if not all(isinstance(claims.get(name), str) for name in ("jti", "family")):
        raise Unauthenticated("the token is malformed")
    revoked = f"refresh:revoked:{claims['family']}"
    if ledger.has(revoked):
        raise Unauthenticated("this login was revoked: log in again")
    # Rotation (RFC 9700, section 4.14.2): each refresh token works once. When a used one
    # comes back, two parties hold the same login, a thief and its owner, and the server
    # cannot tell which is which: it revokes the whole family, so the thief's next
    # refresh fails too, and the owner logs in again. The revocation lasts as long as the
    # family's newest refresh token could (the leeway also covers a refresh racing this one).
    if not ledger.add(f"refresh:used:{claims['jti']}", claims["exp"] + CLOCK_LEEWAY):
        lasts = int(time()) + app.config["REFRESH_LIFETIME"] + CLOCK_LEEWAY
        ledger.add(revoked, lasts)
        logger.warning("refresh token reused: revoked the login of %s", claims["sub"])
        raise Unauthenticated("this refresh token was already used: its login is now revoked")
    return token_pair(claims["sub"], claims["family"])


def line(**fields) -> str:
    return json.dumps(fields) + "\n"


def generate_lines(
    user_id: str, count: int, interval: float, first: int, expires: int
) -> Iterator[str]:
    """Lines `first` to `count` and an end line; or, once the token expires, a line saying so."""
    logger.info("stream for %s from line %d of %d", user_id, first, count)
    seq = first
    try:
        for seq in range(first, count + 1):
            if seq > first and interval:
                sleep(max(0.0, min(interval, expires - time())))  # wake when the token expires
            elif seq % TURN == 0:
                sleep(0.000001)  # a moment for the other streams: see TURN
            if time() >= expires:
                # The status line said 200 long ago and cannot change: the last line says why.
                logger.info("token of %s expired: stream stopped before line %d", user_id, seq)
                yield line(end="token_expired", next=seq)
                return
            yield line(seq=seq, text=f"chunk {seq} of {count} for {user_id}")
        yield line(end="complete")
    except GeneratorExit:  # the server closes the generator when the client has gone
        logger.info("%s disconnected before line %d", user_id, seq)
        raise


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
    """Lines `from` to `count` for the access token's user, until the token expires."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    claims = verify(token.strip(), ACCESS_TOKEN_TYPE)
    count = query_number("count", int, 100, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    first = query_number("from", int, 1, 1, MAX_COUNT)
    if first > count:  # a client that asks for more than there is has lost count: say so
        abort(400, f"from must be at most count ({count}): there is no line {first}")
    lines = generate_lines(claims["sub"], count, interval, first, claims["exp"])
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(lines, mimetype="application/x-ndjson", headers=headers)


@app.errorhandler(Unauthenticated)
def ask_for_a_token(error: Unauthenticated) -> Response:
    challenge = f'Bearer realm="{REALM}"'
    if error.description is None:
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


@app.errorhandler(redis.RedisError)
def ledger_unavailable(error: redis.RedisError) -> Response:
    """Redis down: refuse refreshes for now (503) rather than let a used token pass."""
    logger.warning("the ledger in Redis failed: %s", error)
    return error_as_json(ServiceUnavailable("refresh tokens cannot be checked now: retry soon"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    parser.add_argument("--access-lifetime", type=int, default=60, help="seconds")
    parser.add_argument("--refresh-lifetime", type=int, default=3600, help="seconds")
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
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    try:
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
