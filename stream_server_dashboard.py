"""Step 10: a live dashboard: one sampler for every viewer, and the newest value first.

New since step 4: the events are no longer a feed that each stream counts out for
itself. ONE sampler thread per process reads the host (CPU, memory, network) every
--every seconds and keeps the last HISTORY samples, and every viewer is written
from it: a thousand viewers cost one sampler, not a thousand. A viewer gets the
newest sample at once (?history=N replays the last N first, so a chart starts full),
and a viewer that cannot keep up never gets a backlog: once it can take more, it gets
the newest sample, and the ids show what it skipped. GET / serves a live chart.

Run it, then follow a feed from a second terminal, or open the page in a browser:

    python stream_server_dashboard.py     # serves http://127.0.0.1:5000 (the page)
    python stream_client_dashboard.py     # or: curl -sN "http://127.0.0.1:5000/events?history=3"
"""

import argparse
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from time import sleep

import psutil
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import RequestHandler

logger = logging.getLogger(__name__)
app = Flask(__name__)

MIN_EVERY = 0.05
MAX_INTERVAL = 60
HISTORY = 600  # samples held: ?history and Last-Event-ID reach that far back
NUMBER = {int: re.compile(r"[0-9]{1,9}"), float: re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")}
# Seconds between two samples: --every, or DASHBOARD_EVERY=0.5 gunicorn ... where no flags are.
# Checked here, so that gunicorn.conf.py's start-up check stops gunicorn over a bad one.
app.config["EVERY"] = EVERY = os.environ.get("DASHBOARD_EVERY", "1")
if not NUMBER[float].fullmatch(EVERY) or not MIN_EVERY <= float(EVERY) <= MAX_INTERVAL:
    raise SystemExit(f"DASHBOARD_EVERY must be from {MIN_EVERY} to {MAX_INTERVAL} s, not {EVERY!r}")
RETRY_MS = 2000  # sent as `retry:`: how long a client waits before it reconnects
HEARTBEAT = 15.0  # seconds: a quiet stream sends a comment this often, or proxies may cut it


def event(data: str, event_type: str, event_id: int | None = None) -> str:
    """One event: its id and type, a `data:` line for each line of text, and a blank line."""
    fields = [] if event_id is None else [f"id: {event_id}"]
    fields.append(f"event: {event_type}")
    # A line break inside data would end the field: each line of text gets its own `data:`.
    fields += [f"data: {line}" for line in data.split("\n")]
    return "\n".join(fields) + "\n\n"


class Sampler:
    """Reads the host every `every` seconds in ONE thread, whoever watches; holds the last
    HISTORY samples, each as its finished event, and wakes the viewers when one is added."""

    def __init__(self, every: float) -> None:
        self.every, self.taken, self.running = every, 0, True
        self.viewers = 0  # open event streams of this process: each sample says how many
        self._held: deque[tuple[int, str]] = deque(maxlen=HISTORY)  # (number, event), oldest first
        self._added = threading.Condition()  # guards the two above; notified at each sample
        threading.Thread(target=self._run, name="sampler", daemon=True).start()

    def _run(self) -> None:
        psutil.cpu_percent()  # the first call only starts the count: it measures from here
        sent, received, then = *psutil.net_io_counters()[:2], time.monotonic()
        while self.running:
            sleep(max(0.0, then + self.every - time.monotonic()))  # the reading takes time too
            now, counters = time.monotonic(), psutil.net_io_counters()
            sample = {
                "time": round(time.time(), 3),  # Unix seconds: when, for every viewer alike
                "cpu_percent": psutil.cpu_percent(),  # all cores together: 0 to 100
                "memory_percent": psutil.virtual_memory().percent,
                # psutil counts bytes since boot: a rate is the difference over the time.
                "bytes_sent_per_s": round((counters.bytes_sent - sent) / (now - then)),
                "bytes_recv_per_s": round((counters.bytes_recv - received) / (now - then)),
                "viewers": self.viewers,
            }
            sent, received, then = counters.bytes_sent, counters.bytes_recv, now
            with self._added:
                self.taken += 1
                # Written out once, here: each viewer sends the same text, as it is.
                self._held.append((self.taken, event(json.dumps(sample), "sample", self.taken)))
                self._added.notify_all()

    def watch(self, change: int) -> None:
        """Count a viewer in (+1) or out (-1). Each request runs in its own thread: a lock."""
        with self._added:
            self.viewers += change

    def start_at(self, last_id: int | None, history: int) -> tuple[list[tuple[int, str]], int]:
        """What a new stream sends first, and the number it has seen: the held samples after
        `last_id` when it resumes (unless this process never got that far: it restarted
        since), else the last `history`, at least the newest: the present, at once."""
        with self._added:
            if last_id is not None and last_id <= self.taken:
                return [held for held in self._held if held[0] > last_id], last_id
            return list(self._held)[-max(history, 1) :], 0

    def newest_after(self, number: int, timeout: float) -> list[tuple[int, str]]:
        """The newest sample once there is one after `number`, or nothing after `timeout`."""
        with self._added:
            self._added.wait_for(lambda: self.taken > number, timeout)
            # Whatever came meanwhile, only the newest: a viewer never gets a backlog.
            return [self._held[-1]] if self.taken > number else []


SAMPLER_LOCK = threading.Lock()


def sampler() -> Sampler:
    """This process's one Sampler, started on first use: under gunicorn, one in each worker."""
    with SAMPLER_LOCK:
        if "dashboard" not in app.extensions:
            app.extensions["dashboard"] = Sampler(float(app.config["EVERY"]))
        return app.extensions["dashboard"]


def event_stream(name: str, samples: Sampler, first: list, delivered: int) -> Iterator[str]:
    """Yield the `first` samples, then the newest one each time there is one after them."""
    # The generator runs after the view has returned, when Flask's request context
    # is gone: touching `request` here would raise. So the view reads everything it
    # needs and passes plain values in (flask.stream_with_context is the other way).
    samples.watch(+1)
    logger.info("%s started: %d samples first, then live ones", name, len(first))
    held = first
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            for number, text in held:
                # The event's number is its id: the Last-Event-ID that a client resumes from.
                yield text
                # Execution only comes back here once the server has written the chunk.
                delivered = number
            # While a write waits for a slow viewer, samples pass it by: it gets the newest.
            held = samples.newest_after(delivered, HEARTBEAT)
            if not held:  # a comment: every client ignores it, but the line stays busy
                yield ": keep-alive\n\n"
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        logger.info("%s: client left after event %d; it may resume", name, delivered)
        samples.watch(-1)  # without it, a viewer who left would count as watching forever


def last_event_id() -> int | None:
    """Where to resume: after the Last-Event-ID that a reconnecting client sends, if any."""
    last_id = request.headers.get("Last-Event-ID", "")
    # Read here, in the view: a bad id still gets its 400 before the stream begins.
    if last_id and not (last_id.isascii() and last_id.isdigit() and len(last_id) <= 18):
        abort(400, "Last-Event-ID must be the id of an event this server sent")
    return int(last_id) if last_id else None


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


@app.get("/events")
def stream() -> Response:
    """Stream the samples: the newest (or the last `history`) at once, then each new one."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    history = query_number("history", int, 0, 0, HISTORY)
    samples = sampler()
    first, seen = samples.start_at(last_event_id(), history)
    return sse_response(event_stream(f"viewer at {request.remote_addr}", samples, first, seen))


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


@app.get("/status")
def status() -> Response:
    """Viewers of this process, the samples it has taken, how often, and which process it is."""
    samples = sampler()
    # Each process counts only its own viewers and samples: under gunicorn with several
    # workers, the pid says which worker these numbers belong to.
    taken, every = samples.taken, samples.every
    return jsonify(viewers=samples.viewers, samples_taken=taken, every=every, pid=os.getpid())


@app.get("/")
def index() -> Response:
    """The live chart, for whoever opens this server in a browser."""
    return app.send_static_file("dashboard.html")


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
    parser.add_argument("--every", type=float, default=app.config["EVERY"], help="period, in s")
    args = parser.parse_args()
    if not MIN_EVERY <= args.every <= MAX_INTERVAL:  # "nan" fails this too
        parser.error(f"--every must be from {MIN_EVERY} to {MAX_INTERVAL} seconds")
    app.config["EVERY"] = args.every
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sampler()  # at once, so that the history fills before the first viewer comes
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even GET /status) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler)
