"""The chat step's rooms in Redis: how one server process shares them with every other.

Not a step: the chat step's server (stream_server_chat.py) keeps one Broker per process
and asks it for what each request needs:

    chat = Broker(connect(redis_url, app.config), app.config, message_event)  # once a process
    message_id = chat.post(room, user, text, idempotency_key)    # stored once, whatever retries
    inbox, gap, kept, sent = chat.subscribe(room, user, last_id)  # then take(inbox, ...)
    chat.unsubscribe(room, inbox)                                 # when the stream closes

A message is stored once, by the server, in the room's Redis Stream (key "chat:<room>").
Each process reads new messages with ONE Redis connection, in one thread (a greenlet under
gevent), and puts each in a bounded queue per subscriber: a thousand subscribers cost a
thousand queues, not a thousand connections. It also writes who follows its rooms into
keys that expire, so that a process that dies stops being counted.

What one user may take is bounded whatever a client sends, over every process that shares the
Redis: posts per second (`limiter`, Flask-Limiter's moving window), new rooms per hour and open
streams (both counted in Redis here); and everything a room leaves in Redis expires once the
room is idle for ROOM_TTL seconds.
"""

import logging
import os
import queue
import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from time import monotonic, sleep, time

import redis
from flask import Response
from flask_limiter import Limiter
from werkzeug.exceptions import BadRequest, TooManyRequests

logger = logging.getLogger(__name__)


def counted_in(url: str | None) -> str:
    """Flask-Limiter's storage for a REDIS_URL. (limits calls redis-py's unix:// redis+unix://.
    A REDIS_URL that is no Redis URL fails when the server starts, in connect(), with redis-py's
    own message, not here at import.)"""
    if url and re.match(r"(rediss?|unix)://", url):
        return re.sub(r"^unix://", "redis+unix://", url)
    return "memory://"


# Posts per user, counted by Flask-Limiter (the limits package's moving window): with
# REDIS_URL in Redis, where every process counts the same posts; without it in this process's
# memory, which is all there is then (one process). The storage is chosen from the environment
# the process started with; nothing connects until the first post. The server adds the limit
# to its route with limit_posts().
limiter = Limiter(
    key_func=lambda: "",  # each limit names its own key: the user
    storage_uri=counted_in(os.environ.get("REDIS_URL")),
    strategy="moving-window",  # at most N in ANY window of its length, not per clock window
    key_prefix="chat-limits",
)
# An Idempotency-Key is the client's name for one post: a few dozen printable characters.
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,100}")
KEY_TTL = 24 * 60 * 60  # seconds a post's Idempotency-Key is remembered: a retry comes sooner

# One post, atomically (a Lua script runs whole, and no other command runs meanwhile): a post
# whose Idempotency-Key was seen before returns the first post's id and stores nothing; a post
# that would create a room counts against its user's new rooms of the hour; the message is
# added, the room lives on for ROOM_TTL seconds from now, and the key for KEY_TTL. So a retry
# after a timeout that did store the message finds its id, never a second copy.
POST = """
if ARGV[6] ~= "0" then
    local first = redis.call("GET", KEYS[2])
    if first then return first end
end
if redis.call("EXISTS", KEYS[1]) == 0 then
    local opened = redis.call("INCR", KEYS[3])
    if opened == 1 then redis.call("EXPIRE", KEYS[3], 3600) end
    if opened > tonumber(ARGV[5]) then return {redis.call("TTL", KEYS[3])} end
end
local id = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[3], "*",
                      "user", ARGV[1], "text", ARGV[2])
redis.call("EXPIRE", KEYS[1], ARGV[4])
if ARGV[6] ~= "0" then redis.call("SET", KEYS[2], id, "EX", ARGV[6]) end
return id
"""


def connect(url: str | None, config: dict) -> redis.Redis:
    """A client for the Redis at `url`, or for fakeredis in this process if there is none, with
    at most config["CONNECTIONS"] connections: beyond them, a request waits for a free one
    (a BlockingConnectionPool) instead of failing with "Too many connections"."""
    # The socket timeout outlasts the reader's XREAD BLOCK.
    options = {"decode_responses": True, "socket_timeout": config["PRESENCE_TTL"]}
    options |= {"max_connections": config["CONNECTIONS"]}
    if url:
        logger.info("rooms are in Redis: every process that shares it serves them")
        return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))
    import fakeredis  # only here: it loads numpy, ~14 MB a process that uses Redis

    logger.warning("REDIS_URL is unset: rooms live in this process, which serves "
                   "them alone (no other worker or host sees them)")
    pool = {"connection_pool_class": redis.BlockingConnectionPool}
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), **options, **pool)


def limit_posts(config: dict, user: Callable[[], str]) -> Callable:
    """The decorator that holds each user() to config["POSTS"] (such as "20 per 4 seconds"),
    read at each request: past it, a 429 whose Retry-After and `error` say how long to wait.
    (Flask-Limiter's headers_enabled would send Retry-After on every answer, a 201 too.)"""

    def wait() -> int:  # seconds until the oldest post counted leaves the window
        return max(1, limiter.current_limit.reset_at - int(time()))

    return limiter.limit(
        lambda: config["POSTS"], key_func=user,
        on_breach=lambda _: Response(status=429, headers={"Retry-After": str(wait())}),
        error_message=lambda: f"too many messages: at most {config['POSTS']} per user; "
        f"try again in {wait()} s",
    )


def order(message_id: str) -> tuple[int, int]:
    """Stream ids compare as two numbers, not as text ("9-0" comes before "10-0")."""
    milliseconds, _, sequence = message_id.partition("-")
    return int(milliseconds), int(sequence)


def take(inbox: queue.Queue, timeout: float) -> list:
    """All that waits in an inbox, once the first item has come (within `timeout` seconds, or
    []): a stream that fell behind sends its backlog in one write, not one write each."""
    try:
        items = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    return items + [inbox.get_nowait() for _ in range(inbox.qsize())]  # its only reader


class Broker:
    """A process's link to the rooms in Redis: pooled connections to write, and ONE to read,
    used by one thread that waits for new messages in the rooms followed here and queues each
    for every subscriber. config gives QUEUE (each queue's bound) and PRESENCE_TTL (seconds);
    render(id, fields) makes a message's event, once for all its subscribers. It also gives
    HISTORY, ROOM_TTL (seconds), NEW_ROOMS (per user and hour) and STREAMS (per user)."""

    def __init__(self, client: redis.Redis, config: dict, render: Callable[..., str]) -> None:
        # The reader's own pool of ONE connection, opened when it first reads (client.client()
        # would connect here, and fail the server's start while Redis is down).
        pool = client.connection_pool
        kind, settings = pool.connection_class, pool.connection_kwargs
        one = type(pool)(connection_class=kind, max_connections=1, **settings)
        self.redis, self.reader = client, redis.Redis(connection_pool=one)
        self.config, self.render = config, render  # read at each use: settings may change
        self.instance = secrets.token_hex(6)  # names this process's keys in Redis
        self.wake_key = f"chat-wake:{self.instance}"
        self.lock = threading.Lock()
        self.cursors: dict[str, str] = {}  # room: the newest id queued here
        self.inboxes: dict[str, dict[queue.Queue, str]] = {}  # room: {inbox: its user}
        self.streams: dict[queue.Queue, tuple[str, str]] = {}  # inbox: (user, its entry)
        self.script = client.register_script(POST)
        self.changed = True  # presence to write at once
        self.reads = 0  # XREADs so far: a reader that blocks does few, one that spins, many
        threading.Thread(target=self.read, daemon=True).start()

    def post(self, room: str, user: str, text: str, idempotency_key: str | None) -> str:
        """Store a message in the room's Stream (Redis picks its id) and return the id; with an
        Idempotency-Key this user sent before, the id of that first post instead."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise BadRequest("Idempotency-Key must be 1 to 100 printable ASCII characters")
        keys = [f"chat:{room}", f"chat-posted:{user}:{idempotency_key}", f"chat-opened:{user}"]
        config, ttl = self.config, KEY_TTL if idempotency_key else 0
        args = [user, text, config["HISTORY"], config["ROOM_TTL"], config["NEW_ROOMS"], ttl]
        message_id = self.script(keys=keys, args=args)
        if isinstance(message_id, list):  # the new rooms of the hour are used up
            raise TooManyRequests(
                f"too many new rooms: at most {config['NEW_ROOMS']} per user and hour; "
                "post to a room that has messages, or wait", retry_after=max(1, message_id[0]),
            )
        return message_id

    def open_stream(self, user: str) -> str:
        """Count one more open stream of `user`, over every process, or refuse it with a 429
        past STREAMS. Each is an entry of a sorted set that expires unless this process
        renews it (write_presence): a process that dies stops being counted within
        PRESENCE_TTL seconds. (Expiry is by each process's clock: hosts that share a Redis
        are assumed to agree within a few seconds, as NTP keeps them.)"""
        key, entry = f"chat-streams:{user}", f"{self.instance}:{secrets.token_hex(6)}"
        ttl = self.config["PRESENCE_TTL"]
        with self.redis.pipeline() as pipe:  # MULTI ... EXEC: counted in one step
            pipe.zremrangebyscore(key, "-inf", time()).zadd(key, {entry: time() + ttl})
            counted = pipe.zcard(key).expire(key, ttl).execute()[2]
        if counted > self.config["STREAMS"]:
            self.redis.zrem(key, entry)
            raise TooManyRequests(
                f"too many open streams: at most {self.config['STREAMS']} per user; "
                "close one first", retry_after=ttl,
            )
        return entry

    def subscribe(self, room: str, user: str, last_id: str | None) -> tuple:
        """Join a room. Returns an inbox for the messages to come; the gap, if last_id is no
        longer in the history ({"first_id": where it now begins}, else None); the messages
        kept after last_id (all of them after a gap); and the id they reach up to."""
        # One place more than messages may take: for the final `overflow` or `error`.
        key, inbox = f"chat:{room}", queue.Queue(self.config["QUEUE"] + 1)
        entry = self.open_stream(user)  # a 429 past STREAMS
        try:
            newest = self.redis.xrevrange(key, count=1)
        except redis.RedisError:
            self.close_stream(user, entry)
            raise
        with self.lock:  # new messages are those after the room's cursor: history ends there
            since = self.cursors.setdefault(room, newest[0][0] if newest else "0-0")
            self.inboxes.setdefault(room, {})[inbox] = user
            self.streams[inbox] = (user, entry)
            self.changed = True
        self.wake()  # so that the reader reads this room, and counts its user, from now on
        try:
            gap = None
            if last_id and not self.redis.xrange(key, last_id, last_id):  # trimmed, or not ours
                oldest = self.redis.xrange(key, count=1)
                gap, last_id = {"first_id": oldest[0][0] if oldest else None}, "0-0"
            kept = self.redis.xrange(key, f"({last_id}", since) if last_id else []
        except redis.RedisError:
            self.unsubscribe(room, inbox)
            raise
        return inbox, gap, kept, max(last_id or since, since, key=order)

    def unsubscribe(self, room: str, inbox: queue.Queue) -> None:
        """Leave a room: its inbox gets nothing more, and its stream is no longer counted."""
        with self.lock:
            self.inboxes.get(room, {}).pop(inbox, None)
            user, entry = self.streams.pop(inbox, (None, None))
            self.changed = True
        if entry:
            self.close_stream(user, entry)
        self.wake()  # the reader writes presence at once, not at its next round

    def close_stream(self, user: str, entry: str) -> None:
        """Count a stream no more; if Redis is down, its entry expires by itself."""
        with suppress(redis.RedisError):
            self.redis.zrem(f"chat-streams:{user}", entry)

    def wake(self) -> None:
        """End the reader's XREAD BLOCK early: it includes a stream that only we write to."""
        with suppress(redis.RedisError):  # if Redis is down, the reader is awake anyway
            self.redis.xadd(self.wake_key, {"wake": 1}, maxlen=1)

    def read(self) -> None:
        """The reader: waits for new messages, queues them, keeps presence up to date."""
        woken, refresh_at, failing = "0-0", 0.0, False
        while True:
            every = self.config["PRESENCE_TTL"] / 3  # seconds between two writes of presence
            try:
                if self.changed or monotonic() >= refresh_at:
                    self.write_presence()
                    refresh_at = monotonic() + every
                with self.lock:
                    streams = {f"chat:{room}": cursor for room, cursor in self.cursors.items()}
                streams[self.wake_key] = woken
                self.reads += 1
                for key, messages in self.reader.xread(streams, count=100, block=int(every * 1000)):
                    if key == self.wake_key:
                        woken = messages[-1][0]
                    else:
                        self.hand_over(key.removeprefix("chat:"), messages)
                failing = False
            except Exception as error:  # Redis down (or a bug): the one reader must live on
                with self.lock:
                    ended = [(room, i) for room, each in self.inboxes.items() for i in each]
                    for room, inbox in ended:
                        self.end(room, inbox, "error")
                if ended or not failing:  # once, not every second while Redis is down
                    logger.warning("Redis failed (%s): %d streams ended", error, len(ended))
                failing = True
                sleep(1)  # redis-py reconnects by itself on the next command

    def hand_over(self, room: str, messages: list) -> None:
        """Queue each message for every subscriber of the room; let go of any that lags.
        Each goes as (its id as numbers, its id, its event as bytes): made and encoded once
        for all its subscribers, so that a delivery only compares and writes."""
        bound = self.config["QUEUE"]
        with self.lock:
            for message_id, fields in messages:
                position = order(message_id)
                if room not in self.cursors or position <= order(self.cursors[room]):
                    continue  # queued already (the room was left and joined again)
                self.cursors[room] = message_id
                item = position, message_id, self.render(message_id, fields).encode()
                for inbox in list(self.inboxes[room]):
                    if inbox.qsize() < bound:
                        inbox.put(item)
                    else:  # too slow: memory stays bounded, and it resumes from history
                        self.end(room, inbox, "overflow")

    def end(self, room: str, inbox: queue.Queue, reason: str) -> None:
        """With the lock held: the inbox gets nothing more, and `reason` last."""
        del self.inboxes[room][inbox]
        inbox.put(reason)
        self.changed = True

    def write_presence(self) -> None:
        """Who follows each room here, in keys that expire: if this process dies, its
        streams stop counting within PRESENCE_TTL seconds. Rooms left empty are dropped."""
        with self.lock:
            counts = {room: Counter(each.values()) for room, each in self.inboxes.items()}
            for room in [room for room, users in counts.items() if not users]:
                del self.inboxes[room], self.cursors[room]
            streams = list(self.streams.values())
            self.changed = False
        ttl = self.config["PRESENCE_TTL"]
        with self.redis.pipeline() as pipe:
            for user, entry in streams:  # still open: counted for PRESENCE_TTL more seconds
                key = f"chat-streams:{user}"
                pipe.zadd(key, {entry: time() + ttl}, xx=True).expire(key, ttl)
            for room, users in counts.items():
                # The room's index names the keys of the processes that report on it, so that
                # presence() reads those, not every key in Redis (a SCAN would).
                index = f"chat-presence:{room}"
                pipe.delete(key := f"{index}:{self.instance}")
                if users:
                    pipe.hset(key, mapping=users).expire(key, ttl)
                    pipe.sadd(index, key).expire(index, ttl)
                else:
                    pipe.srem(index, key)
            pipe.expire(self.wake_key, ttl).execute()

    def presence(self, room: str) -> dict[str, int]:
        """Open streams per user in a room, added up over every process that shares Redis, in
        two round trips. A key that has expired (its process died) leaves the room's index."""
        index = f"chat-presence:{room}"
        keys = list(self.redis.smembers(index))
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            reports = pipe.execute()
        users: Counter[str] = Counter()
        for report in reports:
            users.update({user: int(n) for user, n in report.items()})
        if gone := [key for key, report in zip(keys, reports, strict=True) if not report]:
            self.redis.srem(index, *gone)
        return dict(users)
