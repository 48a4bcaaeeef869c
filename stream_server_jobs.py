"""Step 11: the progress of a long job, run outside any request and watched from any process.

New since step 8: the events come from a job, not a chat room. POST /jobs queues the job and
answers 202 at once; an RQ worker, a process of its own, runs it and stores each record's
progress in the job's Redis Stream (jobs.py), which GET /jobs/<id>/events reads after the
Last-Event-ID on any process: history first, then live. The job goes on when its viewers
leave and when the server restarts; if its worker dies, its viewers get `end: lost`.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_jobs.py             # no REDIS_URL: jobs run in threads of this process
    python stream_client_jobs.py             # start a job of 200 records, and watch it

With Redis, jobs run in an RQ worker, and outlive the server:

    export REDIS_URL=redis://127.0.0.1:6379/0      # with redis-server running
    rq worker --url "$REDIS_URL" jobs              # from this folder, in a terminal of its own
    python stream_server_jobs.py --record-seconds 0.1
"""

import argparse
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import redis
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException, ServiceUnavailable

# The jobs in Redis, shared by the server's processes and the worker: a hash, a Stream of
# events and a heartbeat each. See jobs.py.
from jobs import LIVE, LIVENESS, Jobs, connect

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import RequestHandler

# Step 3's tokens, shared: see tokens.py. They say whose job it is.
from tokens import authenticated_user, json_object, load_secret_key, tokens, verify

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.register_blueprint(tokens)  # POST /generate_token, and 401s for bad tokens
app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # {"count": N} is a few bytes
app.config["RECORD_SECONDS"] = 0.1  # how long the stand-in job takes for each record
app.config["MAX_COUNT"] = 10_000  # records in one job, at most: its events are kept in Redis
app.config["RUNNING"] = 3  # jobs one user may have queued or running at once; one more is 429
app.config["CONNECTIONS"] = 50  # to Redis, at most, from this process
# Settings from the environment too, where there are no flags: JOBS_RECORD_SECONDS=0.01 gunicorn
app.config.from_prefixed_env("JOBS")

RETRY_MS = 2000  # sent as `retry:`: how long a client waits before it reconnects
HEARTBEAT = 15.0  # seconds: a quiet stream sends a comment this often, or proxies may cut it
JOB_ID = re.compile(r"[0-9a-f]{24}")  # what Jobs.create makes: anything else is no job
KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # an Idempotency-Key (a UUID, say)
# A Stream id: milliseconds, then a sequence number. At most 19 digits each stays below
# 2**64, Redis's limit, so Redis never refuses one that we pass on.
STREAM_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
STORE_LOCK = threading.Lock()  # two first requests at once must not both make the store


def event(data: str, event_type: str, event_id: str | None = None) -> str:
    """One event: its id and type, a `data:` line for each line of text, and a blank line."""
    fields = [] if event_id is None else [f"id: {event_id}"]
    fields.append(f"event: {event_type}")
    # A line break inside data would end the field: each line of text gets its own `data:`.
    fields += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(fields) + "\n\n"


def store() -> Jobs:
    """This process's Jobs, made on first use: under gunicorn, in each worker."""
    with STORE_LOCK:
        if "jobs" not in app.extensions:
            # A BlockingConnectionPool: beyond CONNECTIONS, a request waits for a free one
            # instead of failing with "Too many connections". The socket timeout outlasts
            # a viewer's XREAD BLOCK.
            options = {"decode_responses": True, "socket_timeout": 2 * HEARTBEAT}
            options |= {"max_connections": app.config["CONNECTIONS"]}
            if url := os.environ.get("REDIS_URL"):
                logger.info("jobs run in RQ workers: every process that shares Redis serves them")
            else:  # fakeredis: the same commands, served from this process's memory
                logger.warning("REDIS_URL is unset: jobs run in threads of this process; they do "
                               "not survive a restart or deploy, and no other process sees them")
            app.extensions["jobs"] = connect(url, options)
        return app.extensions["jobs"]


def event_stream(name: str, job_id: str, sent: str) -> Iterator[str]:
    """Yield the job's events after `sent`, history first, then each as it comes, until `end`."""
    logger.info("%s started after event %s", name, sent)
    # Every so often with no event, look for a job whose worker died: it ends as `lost`.
    wait_ms = int(min(HEARTBEAT, LIVENESS / 2) * 1000)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            events = store().read(job_id, sent, wait_ms)
            for event_id, fields in events:
                yield event(fields["data"], fields["event"], event_id)
                sent = event_id  # where this viewer resumes if the connection drops now
                if fields["event"] == "end":
                    return
            if not events:
                job = store().state(job_id)  # a job whose worker died ends `lost` here
                if job is None or (job["state"] not in LIVE and not store().read(job_id, sent)):
                    return  # expired, or the client came back after the end
                # A comment: every client ignores it, but the line stays busy.
                yield ": keep-alive\n\n"
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        logger.info("%s ended after event %s; it may resume after it", name, sent)


def last_event_id() -> str | None:
    """Where to resume: after the Last-Event-ID (or ?last_event_id=) a client sends."""
    last_id = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if last_id and not STREAM_ID.fullmatch(last_id):
        abort(400, "Last-Event-ID must be the id of an event this server sent")
    return last_id or None


def current_user() -> str:
    """The bearer token's user; to read, the cookie's: EventSource sends no headers."""
    token = request.cookies.get("access_token")
    # A cookie, unlike ?token=, stays out of access logs; and with SameSite=Strict, the page's
    # own: another site's page cannot have it sent.
    if token and request.method == "GET" and "Authorization" not in request.headers:
        return verify(token)["sub"]
    return authenticated_user()


def owned(job_id: str) -> dict:
    """The job, if the user asking started it; 404 otherwise, for a job of someone else too."""
    user = current_user()
    job = store().state(job_id) if JOB_ID.fullmatch(job_id) else None
    # The same answer for someone else's job: no one learns which ids exist.
    if job is None or job["user"] != user:
        abort(404, "no such job (or not yours)")
    return job


@app.post("/jobs")
def start_job() -> Response:
    """Queue a job of `count` records and answer at once, 202, with where to follow it."""
    user, key = authenticated_user(), request.headers.get("Idempotency-Key")
    count = json_object().get("count", 200)
    if type(count) is not int or not 1 <= count <= app.config["MAX_COUNT"]:
        abort(400, f"count must be a whole number from 1 to {app.config['MAX_COUNT']}")
    if key is not None and not KEY.fullmatch(key):
        abort(400, "Idempotency-Key must be 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    # The worker gets the pace with the job: a worker has no flags of the server's to read.
    running, seconds = app.config["RUNNING"], float(app.config["RECORD_SECONDS"])
    # Only queued here: the answer cannot wait for the work. 202 Accepted says just that.
    if (job_id := store().create(user, count, key, seconds, running)) is None:
        abort(429, f"you have {running} jobs queued or running: wait for one to end")
    logger.info("%s started job %s of %d records", user, job_id, count)
    return jsonify(id=job_id), 202, {"Location": f"/jobs/{job_id}"}


@app.get("/jobs/<job_id>")
def job_state(job_id: str) -> Response:
    """The job's state and counts, for its owner."""
    # These fields only: the job's hash holds its user and Idempotency-Key too, no one's business.
    job, fields = owned(job_id), ("state", "done", "total", "failed", "started", "ended")
    return jsonify(id=job_id, **{name: job[name] for name in fields})


@app.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """Follow a job: its events as they come, after Last-Event-ID if the client sends one."""
    owned(job_id)
    name, after = f"a viewer of job {job_id} (pid {os.getpid()})", last_event_id() or "0-0"
    return sse_response(event_stream(name, job_id, after))


@app.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    """Cancel a job: it stops before its next record, and its viewers get `end: cancelled`."""
    owned(job_id)
    # Only the state changes here: the job reads it before each record, and stops.
    if not store().finish(job_id, "cancelled"):
        abort(409, "the job has ended already")
    return jsonify(id=job_id, state="cancelled")


def sse_response(body: Iterator[str]) -> Response:
    """The events as one long response that no cache keeps and no proxy holds back."""
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    return Response(body, mimetype="text/event-stream", headers=headers)


@app.get("/")
def index() -> Response:
    """The page that starts a job, shows its progress with EventSource, and cancels it."""
    return app.send_static_file("jobs.html")


@app.errorhandler(redis.RedisError)
def redis_unavailable(error: redis.RedisError) -> Response:
    """Redis is down or out of reach: 503, and the client tries again later."""
    logger.warning("Redis failed: %s", error)
    return error_as_json(ServiceUnavailable("Redis is unavailable; try again in a moment"))


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
    parser.add_argument("--record-seconds", type=float, default=app.config["RECORD_SECONDS"],
                        help="how long each record of the stand-in job takes (default: 0.1)")
    args = parser.parse_args()
    if not 0 <= args.record_seconds <= 60:
        parser.error("--record-seconds must be from 0 to 60")
    app.config["RECORD_SECONDS"] = args.record_seconds
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    store()  # at once: it says whether jobs run in RQ workers, or in this process only
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even a message's POST) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
