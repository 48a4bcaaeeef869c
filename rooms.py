"""The chat step's rooms in Redis: how one server process shares them with every other.

Not a step: the chat step's server (stream_server_chat.py) keeps one Broker per process
and asks it for what each request needs:

    chat = Broker(redis_client, app.config, message_event)   # once, in each process
    inbox, gap, kept, sent = chat.subscribe(room, user, last_id)  # then inbox.get()...
    chat.unsubscribe(room, inbox)                                 # when the stream closes

A message is stored once, by the server, in the room's Redis Stream (key "chat:<room>").
Each process reads new messages with ONE Redis connection, in one thread (a greenlet under
gevent), and puts each in a bounded queue per subscriber: a thousand subscribers cost a
thousand queues, not a thousand connections. It also writes who follows its rooms into
keys that expire, so that a process that dies stops being counted.
"""

import logging
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from time import monotonic, sleep

import redis

logger = logging.getLogger(__name__)


def order(message_id: str) -> tuple[int, int]:
    """Stream ids compare as two numbers, not as text ("9-0" comes before "10-0")."""
    milliseconds, _, sequence = message_id.partition("-")
    return int(milliseconds), int(sequence)


class Broker:
    """A process's link to the rooms in Redis: pooled connections to write, and ONE to read,
    used by one thread that waits for new messages in the rooms followed here and queues each
    for every subscriber. config gives QUEUE (each queue's bound) and PRESENCE_TTL (seconds);
    render(id, fields) makes a message's event, once for all its subscribers."""

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
        self.changed = True  # presence to write at once
        self.reads = 0  # XREADs so far: a reader that blocks does few, one that spins, many
        threading.Thread(target=self.read, daemon=True).start()

    def subscribe(self, room: str, user: str, last_id: str | None) -> tuple:
        """Join a room. Returns an inbox for the messages to come; the gap, if last_id is no
        longer in the history ({"first_id": where it now begins}, else None); the messages
        kept after last_id (all of them after a gap); and the id they reach up to."""
        # One place more than messages may take: for the final `overflow` or `error`.
        key, inbox = f"chat:{room}", queue.Queue(self.config["QUEUE"] + 1)
        newest = self.redis.xrevrange(key, count=1)
        with self.lock:  # new messages are those after the room's cursor: history ends there
            since = self.cursors.setdefault(room, newest[0][0] if newest else "0-0")
            self.inboxes.setdefault(room, {})[inbox] = user
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
        """Leave a room: its inbox gets nothing more."""
        with self.lock:
            self.inboxes.get(room, {}).pop(inbox, None)
            self.changed = True
        self.wake()

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
        """Queue each message for every subscriber of the room; let go of any that lags."""
        with self.lock:
            for message_id, fields in messages:
                if room not in self.cursors or order(message_id) <= order(self.cursors[room]):
                    continue  # queued already (the room was left and joined again)
                self.cursors[room] = message_id
                text = self.render(message_id, fields)  # made once, queued for every stream
                for inbox in list(self.inboxes[room]):
                    if inbox.qsize() < self.config["QUEUE"]:
                        inbox.put((message_id, text))
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
            self.changed = False
        ttl = self.config["PRESENCE_TTL"]
        with self.redis.pipeline() as pipe:
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
