"""Step 3's tokens: mint a JWT for a user, check the one a request brings, refuse clearly.

Not a server: step 3's server (stream_server_multiuser_secure.py) and every later step
that takes tokens import what they need from here, so that no step copies it:

    from tokens import authenticated_user, load_secret_key, tokens
    app.register_blueprint(tokens)       # POST /generate_token, and 401s for bad tokens
    app.config["JWT_SECRET_KEY"] = load_secret_key()       # in __main__, never at import

    @app.get("/stream")
    def stream():
        user_id = authenticated_user()   # before the first chunk: a 401 says why not

The functions use current_app, not an app of their own, so each step's app brings its
own JWT_SECRET_KEY (and TOKEN_LIFETIME, if it changes it).
"""

import logging
import os
import re
import secrets
from time import time

import jwt
from flask import Blueprint, Response, abort, current_app, jsonify, request

logger = logging.getLogger(__name__)
tokens = Blueprint("tokens", __name__)  # the routes and the 401 handler, for each step's app

# Not only dots: "." and ".." are path segments that URL normalisation would resolve away.
USER_ID = re.compile(r"(?!\.+$)[A-Za-z0-9_.-]{1,64}")
TOKEN_LIFETIME = 15 * 60  # seconds, unless app.config["TOKEN_LIFETIME"] says otherwise
MAX_TOKEN_LENGTH = 1024  # ours are about 250 characters; refuse to parse anything huge
# The JWT header that marks an access token (RFC 9068). Every step that takes tokens
# requires it, so a token minted for another purpose (a refresh token) opens no stream.
ACCESS_TOKEN_TYPE = "at+jwt"
# Seconds of clock difference forgiven in exp and iat: a token minted on a host whose
# clock runs slightly ahead is not "not valid yet" here.
CLOCK_LEEWAY = 10
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


def mint(user_id: str, lifetime: int, typ: str = ACCESS_TOKEN_TYPE, **claims) -> str:
    """A signed token for `user_id` that lasts `lifetime` seconds, of JWT type `typ`."""
    now = int(time())
    # A JWT is signed, not encrypted: anyone holding it can read these claims,
    # so nothing secret goes in. The signature only proves we wrote them.
    claims |= {"sub": user_id, "iat": now, "exp": now + lifetime}
    key, header = current_app.config["JWT_SECRET_KEY"], {"typ": typ}
    return jwt.encode(claims, key, algorithm="HS256", headers=header)


@tokens.post("/generate_token")
def generate_token() -> Response:
    """Mint an access token for the user that authenticate() vouches for."""
    user_id = authenticate(json_object())
    lifetime = current_app.config.get("TOKEN_LIFETIME", TOKEN_LIFETIME)
    token = mint(user_id, lifetime)
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


def verify(token: str, typ: str = ACCESS_TOKEN_TYPE, wrong_type: str = WRONG_TYPE) -> dict:
    """The claims of a valid token whose JWT header says it is of type `typ`."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthenticated("the token is too long")
    try:
        decoded = jwt.decode_complete(  # the header too, for its typ
            token,
            current_app.config["JWT_SECRET_KEY"],
            algorithms=["HS256"],  # pinned: never let the token choose (think "alg": "none")
            options={"require": ["exp", "iat", "sub"]},
            leeway=CLOCK_LEEWAY,
        )
    except jwt.PyJWTError as error:  # not just InvalidTokenError: InvalidKeyError is outside it
        problems = [text for kind, text in TOKEN_PROBLEMS.items() if isinstance(error, kind)]
        raise Unauthenticated(problems[0] if problems else "the token is malformed") from None
    if decoded["header"].get("typ") != typ:
        raise Unauthenticated(wrong_type)
    return decoded["payload"]


def access_claims() -> dict:
    """The claims of a valid bearer access token, checked before any response is started."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    return verify(token.strip())


def authenticated_user() -> str:
    """The user id of a valid bearer token, checked before any response is started."""
    return access_claims()["sub"]


@tokens.app_errorhandler(Unauthenticated)  # on every route of the app, not only the blueprint's
def ask_for_a_token(error: Unauthenticated) -> Response:
    """401 with a Bearer challenge that says what is wrong with the token, if there was one."""
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
