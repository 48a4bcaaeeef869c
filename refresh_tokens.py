"""Step 6's tokens: a pair at each login, a refresh token that works once, a ledger of used ones.

Not a server: step 6's server (stream_server_multiuser_refresh.py) and step 7's import it
in place of step 3's blueprint, so that neither copies it:

    from refresh_tokens import ACCESS_LIFETIME, REFRESH_LIFETIME, ledger, refresh_tokens
    app.register_blueprint(refresh_tokens)  # POST /generate_token, POST /refresh_token, 401s
    ledger.open(os.environ.get("REDIS_URL"))  # in __main__: where used tokens are kept

The access token is step 3's, only shorter-lived: every step that takes tokens opens
streams with it. The refresh token, marked by its own JWT type, does one thing: at
POST /refresh_token it buys a new pair, once. When a used one comes back, the whole
login it descends from is revoked. Minting and checking are step 3's (tokens.py).
"""

import contextlib
import logging
import os
import secrets
import threading
from time import time

import redis
from flask import Blueprint, Response, abort, current_app, jsonify

from tokens import (
    CLOCK_LEEWAY,
    Unauthenticated,
    ask_for_a_token,
    authenticate,
    json_object,
    mint,
    verify,
)

logger = logging.getLogger(__name__)
refresh_tokens = Blueprint("refresh_tokens", __name__)  # the routes and the error handlers
refresh_tokens.app_errorhandler(Unauthenticated)(ask_for_a_token)  # step 3's 401s, unchanged

# Seconds, unless app.config["ACCESS_LIFETIME"] or ["REFRESH_LIFETIME"] says otherwise.
ACCESS_LIFETIME = 60  # short, so a stolen access token soon stops working
REFRESH_LIFETIME = 60 * 60  # how long a client may stay away and still renew without a login
# A refresh token's own mark: no step takes it for an access token, nor an access token for it.
REFRESH_TOKEN_TYPE = "refresh+jwt"
NOT_REFRESHABLE = f"not a refresh token (its JWT header lacks typ {REFRESH_TOKEN_TYPE})"


class EvictingRedis(redis.RedisError, ValueError):
    """The Redis would forget the ledger's keys when full: a RedisError, so a refresh gets 503,
    and a ValueError, which the servers' __main__ reports for REDIS_URL, refusing to start."""


def eviction(store: redis.Redis) -> EvictingRedis | None:
    """Why `store` may evict keys, if it may. A Redis with maxmemory set (0: no limit) frees
    memory by its maxmemory-policy: noeviction refuses writes instead (a 503 here), and every
    other policy deletes keys, volatile-* those with an expiry, as every key of the ledger has.
    A used token whose key was deleted would buy a new pair once more: the ledger fails closed."""
    memory = store.info("memory")
    policy, limit = memory.get("maxmemory_policy"), int(memory.get("maxmemory", 0))
    if policy == "noeviction" or not limit:
        return None
    return EvictingRedis(
        f"the Redis at REDIS_URL deletes keys when it is full (maxmemory-policy {policy}, "
        f"maxmemory {limit} bytes), and a used refresh token whose key it deleted would work "
        "again: set maxmemory-policy noeviction there (CONFIG SET maxmemory-policy noeviction, "
        "and in redis.conf), or give the ledger a Redis of its own with that setting"
    )


class RefreshTokenLedger:
    """The refresh tokens already used and the logins revoked, each kept until it would
    expire anyway. In this process's memory; with REDIS_URL, in Redis, which every worker
    and host shares and which outlives a restart of the server, and only in a Redis that
    never deletes a key before it expires (see eviction())."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._memory: dict[str, int] = {}  # key -> when it expires
        self._redis: redis.Redis | None = None
        self._opened = False

    def open(self, redis_url: str | None) -> None:
        """Choose where the ledger lives, and say so: at start in __main__; under gunicorn
        on first use, in the worker, so that no worker shares another's connection."""
        self._opened = True
        if redis_url:
            self._redis = redis.Redis.from_url(redis_url)  # it connects when first used
            try:
                if problem := eviction(self._redis):  # at start, in __main__: it does not start
                    raise problem
                logger.info("REDIS_URL is set: used refresh tokens are kept in Redis")
            except EvictingRedis:
                raise
            except redis.RedisError as error:  # not fatal: refreshes get 503 until it answers
                logger.warning("REDIS_URL is set, but Redis does not answer (%s): "
                               "refreshes fail with 503 until it does", error)
        else:
            # Every process keeps its own: a token used in one worker works once more in
            # each other worker, and once more after a restart.
            logger.warning("REDIS_URL is unset: reuse is detected within this process only")

    def __len__(self) -> int:
        """Entries kept in this process's memory (none with Redis): bounded by expiry."""
        return len(self._memory)

    def _store(self) -> redis.Redis | None:
        with self._lock:
            if not self._opened:
                with contextlib.suppress(EvictingRedis):  # checked below, at every use
                    self.open(os.environ.get("REDIS_URL"))
        # At every use, not only at start: maxmemory and its policy can change at run time.
        if self._redis is not None and (problem := eviction(self._redis)):
            raise problem  # a 503, and the log says what to change
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


def json_field(name: str) -> str:
    """A string field of the JSON object in the request body, or 400."""
    value = json_object().get(name)
    if not isinstance(value, str):
        abort(400, f'send a JSON object with a string "{name}"')
    return value


def token_pair(user_id: str, family: str) -> Response:
    """A new access token and a new refresh token; the JWT header's typ tells them apart."""
    access = current_app.config.get("ACCESS_LIFETIME", ACCESS_LIFETIME)
    refresh = current_app.config.get("REFRESH_LIFETIME", REFRESH_LIFETIME)
    # jti, a unique id, is what the ledger remembers once the token has been used;
    # family, the login the token descends from, is what the reuse of any member revokes.
    jti = secrets.token_hex(16)
    response = jsonify(
        access_token=mint(user_id, access),  # step 3's kind: typ at+jwt, sub, iat, exp
        refresh_token=mint(user_id, refresh, REFRESH_TOKEN_TYPE, jti=jti, family=family),
        token_type="Bearer",
        expires_in=access,
        refresh_expires_in=refresh,
    )
    response.headers["Cache-Control"] = "no-store"  # RFC 6749, 5.1: tokens must not be cached
    return response


@refresh_tokens.post("/generate_token")
def generate_token() -> Response:
    """Mint a pair for the user that authenticate() vouches for: a new login."""
    user_id = authenticate(json_object())
    # A login starts a new family: every refresh token it leads to carries its id.
    return token_pair(user_id, family=secrets.token_hex(16))


@refresh_tokens.post("/refresh_token")
def refresh_token() -> Response:
    """Trade a refresh token, once, for a new pair of the same login."""
    claims = verify(json_field("refresh_token"), REFRESH_TOKEN_TYPE, NOT_REFRESHABLE)
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
        lasts = int(time()) + current_app.config.get("REFRESH_LIFETIME", REFRESH_LIFETIME)
        ledger.add(revoked, lasts + CLOCK_LEEWAY)
        logger.warning("refresh token reused: revoked the login of %s", claims["sub"])
        raise Unauthenticated("this refresh token was already used: its login is now revoked")
    return token_pair(claims["sub"], claims["family"])


@refresh_tokens.app_errorhandler(redis.RedisError)
def ledger_unavailable(error: redis.RedisError) -> Response:
    """Redis down: refuse refreshes for now (503) rather than let a used token pass."""
    logger.warning("the ledger in Redis failed: %s", error)
    response = jsonify(error="refresh tokens cannot be checked now: retry soon")
    response.status_code = 503
    return response
