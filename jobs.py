"""Step 11's jobs: the stand-in job, and what the server and the RQ worker share in Redis.

Not a step: stream_server_jobs.py keeps one Jobs store per process and asks it for what each
request needs; the job itself, run(), runs in an RQ worker, started from this folder with
`rq worker --url "$REDIS_URL" jobs`, or without REDIS_URL in a thread of the server:

    store = Jobs(redis_client, queue)            # once, in each process (queue None: threads)
    job_id = store.create(user, count, key, record_seconds)   # queued, and started
    store.state(job_id)                          # its state and counts; `lost` if it died
    store.read(job_id, after, block_ms)          # its events after a Stream id, or wait
    store.finish(job_id, "cancelled")            # ends it, unless it has ended already

A job is three keys: job:<id>, a hash of its user, state, counts and times; job:<id>:events,
a Redis Stream of its events, whose ids are the events' ids; and job:<id>:alive, a heartbeat
that the job's process renews and that expires when that process dies. JOB_LIVENESS and
JOB_TTL, read from the environment by the server and the worker alike, set their times.
"""

import json
import logging
import os
import secrets
import threading
from time import sleep, time

import redis

logger = logging.getLogger(__name__)


def seconds(name: str, default: float) -> float:
    """A number of seconds from the environment, or a clear exit: read by both processes."""
    raw = os.environ.get(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        value = 0
    if not 0 < value < 10**9:
        raise SystemExit(f"{name} must be a number of seconds above 0, got {raw!r}")
    return value


# A job whose process died (SIGKILL, a lost host) is `lost` within this many seconds: its
# heartbeat lives half of it and is renewed every sixth, and a viewer checks every half.
LIVENESS = seconds("JOB_LIVENESS", 30)
TTL = int(seconds("JOB_TTL", 24 * 60 * 60))  # how long a job's state and events outlive it
LIVE = ("queued", "running")  # the states of a job that has not ended: then done, failed,
# cancelled or lost, each the data of the job's last event, `end`
FAILS_EVERY = 17  # the stand-in's records 17, 34, 51... fail, the same in every run


def process(number: int, record_seconds: float) -> None:
    """THE STAND-IN for real work (importing one row of a file, say): it takes record_seconds,
    and some records fail, deterministically, with a ValueError as a real record would."""
    sleep(record_seconds)
    if number % FAILS_EVERY == 0:
        raise ValueError(f"record {number}: the price is not a number")


def run(job_id: str, count: int, record_seconds: float) -> None:
    """The RQ worker's entry point (jobs.run): the job, on the worker's own Redis."""
    from rq import get_current_job  # here: the server without REDIS_URL needs no RQ

    pool = get_current_job().connection.connection_pool  # RQ's: bytes; ours decodes text
    text = {**pool.connection_kwargs, "decode_responses": True}
    client = redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class, **text))
    work(Jobs(client), job_id, count, record_seconds)


def work(store: "Jobs", job_id: str, count: int, record_seconds: float) -> None:
    """Process the records one by one, each one's progress an event, until done or stopped."""
    stop = threading.Event()
    if not store.begin(job_id):  # cancelled while it waited in the queue
        return
    # The heartbeat beats in a thread of its own: a slow record does not make the job lost.
    threading.Thread(target=store.beat, args=(job_id, stop), daemon=True).start()
    try:
        for number in range(1, count + 1):
            error = None
            try:
                process(number, record_seconds)
            except ValueError as failure:  # the record fails, the job goes on
                error = str(failure)
            if not store.progress(job_id, number, count, error):
                return  # cancelled (or found lost): stop before the next record
        store.finish(job_id, "done")
    except Exception:  # a bug, Redis gone: `failed`, and RQ or the thread logs why
        store.finish(job_id, "failed")
        raise
    finally:
        stop.set()


def connect(url: str | None, options: dict) -> "Jobs":
    """The Jobs of the Redis at `url`, run by RQ workers; without a url, of a fakeredis in
    this process, run by its threads. options are redis-py's, for the server's connections."""
    if url is None:
        import fakeredis  # only here: it loads numpy, ~14 MB a process that uses Redis

        pool = {"connection_pool_class": redis.BlockingConnectionPool}
        return Jobs(fakeredis.FakeRedis(server=fakeredis.FakeServer(), **options, **pool))
    from rq import Queue  # only here: the server without Redis needs no RQ

    # A BlockingConnectionPool: beyond max_connections, a request waits for a free one.
    client = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(url, **options))
    # RQ keeps its own keys in bytes: a connection of its own, without decoding.
    return Jobs(client, Queue("jobs", connection=redis.Redis.from_url(url)))


class Jobs:
    """The jobs in one Redis (or in fakeredis, in one process), for the server and the job.
    queue is RQ's queue to enqueue into; None runs each job in a thread of this process."""

    def __init__(self, client: redis.Redis, queue=None) -> None:
        self.redis, self.queue = client, queue

    def create(self, user: str, count: int, key: str | None, record_seconds: float,
               most: int) -> str | None:
        """A new job for `user`, queued; for an Idempotency-Key seen before, that job; None if
        the user has `most` jobs queued or running already."""
        if key and (earlier := self.redis.get(f"job-key:{user}:{key}")):
            return earlier  # the retry of a request we took: the same job
        if self.running(user) >= most:
            return None
        job_id = secrets.token_hex(12)
        if key and not self.redis.set(f"job-key:{user}:{key}", job_id, nx=True, ex=TTL):
            return self.redis.get(f"job-key:{user}:{key}")  # a retry that overtook this one
        fields = {"user": user, "state": "queued", "done": 0, "total": count, "failed": 0}
        with self.redis.pipeline() as pipe:
            pipe.hset(f"job:{job_id}", mapping=fields | {"started": "", "ended": ""})
            pipe.expire(f"job:{job_id}", TTL).sadd(f"jobs-of:{user}", job_id)
            pipe.expire(f"jobs-of:{user}", TTL).execute()
        arguments = (job_id, count, record_seconds)
        if self.queue is None:  # daemon: it dies with the server, as the server said at start
            threading.Thread(target=work, args=(self, *arguments), daemon=True).start()
        else:  # no time limit from RQ: a job that hangs is still alive; one that dies is lost
            self.queue.enqueue(run, *arguments, job_id=job_id, job_timeout=-1, result_ttl=TTL,
                               failure_ttl=TTL)
        return job_id

    def running(self, user: str) -> int:
        """How many of the user's jobs are queued or running (ended ones leave the count)."""
        mine = self.redis.smembers(f"jobs-of:{user}")
        ended = [job for job in mine if (self.state(job) or {}).get("state") not in LIVE]
        if ended:
            self.redis.srem(f"jobs-of:{user}", *ended)
        return len(mine) - len(ended)

    def state(self, job_id: str) -> dict | None:
        """The job's hash, its numbers as numbers; a running job without a heartbeat is lost."""
        job = self.redis.hgetall(f"job:{job_id}")
        if job.get("state") == "running" and not self.redis.exists(f"job:{job_id}:alive"):
            self.finish(job_id, "lost")  # its process died: its viewers are told, by `end`
            job = self.redis.hgetall(f"job:{job_id}")
        for name in ("done", "total", "failed", "started", "ended"):
            if name in job:
                job[name] = int(job[name]) if job[name] else None
        return job or None

    def read(self, job_id: str, after: str, block_ms: int | None = None) -> list:
        """The events after `after`: at once if there are any; else, with block_ms, the first
        to come within that time."""
        streams = self.redis.xread({f"job:{job_id}:events": after}, count=100, block=block_ms)
        return streams[0][1] if streams else []

    def begin(self, job_id: str) -> bool:
        """Mark a queued job running, with its first heartbeat; False if it is not queued."""
        return self._change(job_id, ("queued",), {"state": "running", "started": int(time())})

    def beat(self, job_id: str, stop: threading.Event) -> None:
        """Renew the heartbeat until the job stops; if this process dies, it expires."""
        while not stop.wait(LIVENESS / 6):
            self.redis.set(f"job:{job_id}:alive", 1, px=int(LIVENESS * 500), xx=True)
        self.redis.delete(f"job:{job_id}:alive")

    def progress(self, job_id: str, number: int, count: int, error: str | None) -> bool:
        """Count one record, and store its event; False if the job is no longer running."""
        data = {"done": number, "total": count, "record": number}
        data |= {"error": error} if error else {}
        added = {"failed": 1} if error else {}
        return self._change(job_id, ("running",), {"done": number}, ("progress", data), added)

    def finish(self, job_id: str, state: str) -> bool:
        """End a job that has not ended yet with `state`, and its events with `end`."""
        return self._change(job_id, LIVE, {"state": state, "ended": int(time())},
                            ("end", {"state": state}))

    def _change(self, job_id: str, expected: tuple, fields: dict, event: tuple = (),
                added: dict | None = None) -> bool:
        """Change the job only if its state is still one of `expected`, its event with it: the
        worker, the server and a cancel may race, and an `end` must stay the last event."""
        key, events = f"job:{job_id}", f"job:{job_id}:events"
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # the transaction fails if anyone changes the job meanwhile
                    if pipe.hget(key, "state") not in expected:
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping=fields)
                    for name, amount in (added or {}).items():
                        pipe.hincrby(key, name, amount)
                    if fields.get("state") == "running":  # the first heartbeat, with the state
                        pipe.set(f"{key}:alive", 1, px=int(LIVENESS * 500))
                    if event:
                        pipe.xadd(events, {"event": event[0], "data": json.dumps(event[1])})
                    pipe.expire(key, TTL).expire(events, TTL).execute()
                    return True
                except redis.WatchError:
                    continue  # changed under us: look again
