"""Step 6: long-lived secure streams: short access tokens, refresh tokens, resume, HTTPS.

New since step 3: minting returns two tokens. The access token opens streams and
lasts a minute; the refresh token lasts an hour and can only buy a new pair, once,
at POST /refresh_token. A stream stops the moment its access token expires, with
a last line that says so and where to go on; the client refreshes its tokens and
resumes with GET /stream?from=N, with no gap and no duplicate. Every line is a
JSON object that carries its sequence number.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_multiuser_refresh.py --cert certs/server.pem --key certs/server.key
    python stream_client_multiuser_refresh.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Iterator
from time import sleep, time

import jwt
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = 1024
app.config["ACCESS_LIFETIME"] = 60  # seconds: short, so a stolen access token soon stops working
app.config["REFRESH_LIFETIME"] = 60 * 60

MAX_COUNT = 1_000_000
MAX_INTERVAL = 60
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}
# At interval=0 a stream never pauses, and while its client keeps reading, none of its
# writes waits either. Threads take turns regardless, but a gevent greenlet lets the others
# run only when it waits: such a stream would keep its whole worker to itself until it ends.
# So it waits a microsecond every TURN chunks. (Not sleep(0): gevent may then run it again
# before it looks at the network, as gevent's documentation warns.)
TURN = 500
# Seconds a client has to send its request (over HTTPS, to finish the TLS handshake first),
# then to accept each piece of the answer. Without them, a client that connects and sends
# nothing, or that stops reading, holds its thread forever. A client may take as long to
# accept a chunk as the server may take to send one, so WRITE_TIMEOUT exceeds MAX_INTERVAL.
REQUEST_TIMEOUT = 5
WRITE_TIMEOUT = 90
MAX_TOKEN_LENGTH = 1024
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
        raise SystemExit("JWT_SECRET_KEY must be set, at least 32 bytes (HS256 needs 256 bits)")
    return secret.encode()



class RefreshTokenLedger:
    """The refresh tokens already used, kept until they expire anyway. One process's memory:
    several workers or hosts share it instead in Redis (SET id NX with an expiry) or a database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}  # token id (jti) -> when the token expires

    def use(self, token_id: str, expires: int) -> bool:
        """Record a use; False if the token was used before."""
        with self._lock:
            self._used = {jti: exp for jti, exp in self._used.items() if exp > time()}
            if token_id in self._used:
                return False
            self._used[token_id] = expires
            return True


ledger = RefreshTokenLedger()


class Unauthenticated(Exception):
    """No usable credentials: answered with 401 and a Bearer challenge (RFC 6750)."""

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)
        self.description = description


def json_field(name: str) -> str:
    """A string field of the JSON object in the request body, or 400."""
    body = request.get_json(silent=True) if request.is_json else None
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str):
        abort(400, f'send a JSON object with a string "{name}", as application/json')
    return value


def token_pair(user_id: str) -> Response:
    """A new access token and a new refresh token; the `use` claim tells them apart."""
    now, key = int(time()), app.config["JWT_SECRET_KEY"]
    access, refresh = app.config["ACCESS_LIFETIME"], app.config["REFRESH_LIFETIME"]
    claims = {"sub": user_id, "iat": now}
    access_claims = {**claims, "exp": now + access, "use": "access"}
    # jti, a unique id, is what the ledger remembers once the token has been used.
    refresh_claims = {
        **claims,
        "exp": now + refresh,
        "use": "refresh",
        "jti": secrets.token_hex(16),
    }
    response = jsonify(
        access_token=jwt.encode(access_claims, key, algorithm="HS256"),
        refresh_token=jwt.encode(refresh_claims, key, algorithm="HS256"),
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
    return token_pair(user_id)


TOKEN_PROBLEMS = {
    jwt.ExpiredSignatureError: "the token has expired",
    jwt.ImmatureSignatureError: "the token is not valid yet",
    jwt.MissingRequiredClaimError: "the token lacks a required claim",
    jwt.InvalidSignatureError: "the token signature does not match",
    jwt.InvalidAlgorithmError: "the token is not signed with HS256",
}
WRONG_USE = {
    "access": "a refresh token cannot open a stream: refresh it for an access token",
    "refresh": "only a refresh token can be refreshed",
}


def verify(token: str, use: str) -> dict:
    """The claims of a valid token meant for `use` ("access" or "refresh")."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("the token is too long")
    try:
        claims = jwt.decode(
            token,
            app.config["JWT_SECRET_KEY"],
            algorithms=["HS256"],
            options={"require": ["exp", "iat", "sub", "use"]},
        )
    except jwt.PyJWTError as error:
        problems = [text for kind, text in TOKEN_PROBLEMS.items() if isinstance(error, kind)]
        raise Unauthenticated(problems[0] if problems else "the token is malformed") from None
    if claims["use"] != use:
        raise Unauthenticated(WRONG_USE[use])
    if use == "refresh" and not isinstance(claims.get("jti"), str):
        raise Unauthenticated("the token is malformed")
    return claims


@app.post("/refresh_token")
def refresh_token() -> Response:
    claims = verify(json_field("refresh_token"), "refresh")
    # Rotation: each refresh token works once. A thief who copied one can use it at
    # most once, and then the real client's next refresh fails and shows the theft.
    if not ledger.use(claims["jti"], claims["exp"]):
        raise Unauthenticated("this refresh token was already used")
    return token_pair(claims["sub"])


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
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    claims = verify(token.strip(), "access")
    count = query_number("count", int, 100, 1, MAX_COUNT)
    interval = query_number("interval", float, 0.5, 0, MAX_INTERVAL)
    first = query_number("from", int, 1, 1, MAX_COUNT)
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


class DeferredHandshake(ssl.SSLContext):
    """A server context whose connections do their TLS handshake on their first read, in
    their own thread, within REQUEST_TIMEOUT. By default the handshake happens in accept(),
    in the one thread that accepts every connection: a client that connected and sent
    nothing would stop the server."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        return super().wrap_socket(sock, server_side, do_handshake_on_connect=False, **kwargs)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """HTTPS: without it, anyone on the network path can read the bearer tokens."""
    context = DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def set_write_timeout(sock: socket.socket) -> None:
    """End the connection of a client that accepts no data for WRITE_TIMEOUT seconds: the
    write that waits fails with TimeoutError, and the stream ends as if the client hung up."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: the kernel keeps the time, at no cost
        sock.settimeout(None)  # REQUEST_TIMEOUT is over
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(WRITE_TIMEOUT * 1000))
    else:  # elsewhere Python does, with one more system call for every write
        sock.settimeout(WRITE_TIMEOUT)


class RequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, with REQUEST_TIMEOUT and WRITE_TIMEOUT on its connection."""

    timeout = REQUEST_TIMEOUT  # setup() puts it on the socket, before the request is read

    def run_wsgi(self) -> None:
        set_write_timeout(self.connection)  # the request is in: now the answer
        super().run_wsgi()


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
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    try:
        context = tls_context(args.cert, args.key) if args.cert else None
    except OSError as error:
        parser.error(f"cannot use --cert {args.cert} --key {args.key}: {error}")
    app.config.update(ACCESS_LIFETIME=args.access_lifetime, REFRESH_LIFETIME=args.refresh_lifetime)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    app.run(
        host=args.host,
        port=args.port,
        threaded=True,
        ssl_context=context,
        request_handler=RequestHandler,
    )
