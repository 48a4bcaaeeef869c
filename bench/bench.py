"""Measure the step servers: one stream, many streams on one process, one message to thousands.

Its parts, all on 127.0.0.1:
  - streams: step 2's app under Werkzeug's dev server and gunicorn (gthread, gevent): the first
    chunk's delay, how far paced gaps stray, the rate of one unpaced stream, 10-500 one-second
    streams started at once (the median of three runs), and the server's memory growth;
  - capacity: N concurrent paced streams (a ladder, 1,000 / 5,000 / 10,000 by default) on ONE
    gevent worker of step 2 and on the uvicorn reference: streams completed, errors, the time to
    open them all, the server's RSS growth per stream, and each chunk's lateness against its
    schedule once all are open;
  - fan-out: the chat step (step 8) with S subscribers (a ladder up to 5,000) and one poster
    sending M messages a second for T seconds: two `gunicorn -k gevent -w 1` instances sharing one
    redis-server, one instance with its in-process broker, and the same room on Starlette and
    uvicorn with redis.asyncio: deliveries per second, the latency from each POST's response to
    each receipt (counted from the room's first message: no warm-up), messages lost and
    duplicated, the servers' RSS per subscriber and CPU per delivery;
  - dashboard: the dashboard step (step 10) with V viewers (100 and 1,000 by default), one in ten
    of them reading nothing, on one gevent worker and on two (each worker has its own sampler):
    the samples each sampler takes a second, the gaps between two samples as the viewers that
    read get them, the samples they skipped, the servers' RSS per viewer and CPU;
  - completions: N streamed completions at once (1,000 and 5,000) of step 9 on one gevent
    worker and of its peer, the same route on uvicorn + Starlette + sse-starlette with the same
    stand-in model at the same pace: time to first token, each token's lateness against its
    pace, RSS per stream, server CPU per token, errors;
  - relay: step 9 as a gateway (--upstream) in front of another instance of step 9, 100 streams:
    what the relay adds to each token, and how soon the upstream stops once a client leaves;
  - viewers: V viewers (1,000 and 10,000) of step 10 on one gevent worker and of its peer on
    sse-starlette with one shared sampler, a sample a second, without and with one viewer in ten
    stalled: the time from a sample to its last viewer, RSS per viewer, memory while watching.
Then every target is checked in this one run and printed as met, NOT MET, or NOT MEASURED (a
target the run did not measure, such as a quick run's, is never met) with its figure.
Every load is bounded in count and time, and every process is stopped by the PID it started.

    python bench/bench.py                       # everything, full loads: about 18 minutes
    python bench/bench.py --quick               # everything, small loads: a few minutes (CI)
    python bench/bench.py --capacity            # only capacity; --capacity 2000,4000 another ladder
    python bench/bench.py --fanout 500,5000 --rate 10 --seconds 10   # only fan-out
    python bench/bench.py --dashboard 100,1000 --seconds 10          # only the dashboard
    python bench/bench.py --completions 1000,5000 --relay 100 --viewers 1000,10000  # 9 and 10
    python bench/bench.py --markdown bench/results.md --json bench/results.json --check
    python bench/graphs.py bench/results.json   # the graphs in docs/, from the JSON
"""

import argparse
import collections
import contextlib
import datetime
import errno
import http.client
import importlib.util
import itertools
import json
import os
import platform
import re
import resource
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jwt
import psutil

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--graceful-timeout", "1"]
SERVERS = {  # name: command, with {module} and {port} filled in
    "dev server (threaded)": [sys.executable, "{module}.py", "--port", "{port}"],
    "gunicorn gthread": [*GUNICORN, "-k", "gthread", "-b", f"{HOST}:{{port}}", "{module}:app"],
    "gunicorn gevent": [*GUNICORN, "-k", "gevent", "-b", f"{HOST}:{{port}}", "{module}:app"],
}
# References, not steps. The same stream as a bare WSGI app under the same gunicorn command:
# what gunicorn costs without Flask. And on Starlette and uvicorn (bench/requirements.txt).
SERVERS["gunicorn gevent, bare WSGI (reference)"] = [
    *SERVERS["gunicorn gevent"][:-1],
    "--pythonpath",
    "bench",
    "wsgi_app:app",
]
UVICORN = [sys.executable, "-m", "uvicorn", "--app-dir", "bench", "--port", "{port}"]
UVICORN += ["--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "1"]
HAS_UVICORN = all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn"))
if HAS_UVICORN:
    SERVERS["uvicorn + Starlette (reference)"] = [*UVICORN, "starlette_app:app"]
GEVENT, REFERENCE = "gunicorn gevent", "uvicorn + Starlette (reference)"
# Capacity and fan-out: ONE process per instance, its connection limit and listen backlog set
# on the command line. gunicorn.conf.py's worker_connections (1,000) would cap a gevent worker
# at 1,000 streams, the rest waiting in the listen queue.
ONE_WORKER = ["-w", "1", "--worker-connections", "{connections}", "--backlog", "{backlog}"]
CAPACITY_SERVERS = {
    "gunicorn -k gevent -w 1": [*SERVERS[GEVENT][:-1], *ONE_WORKER, "{module}:app"],
    "uvicorn + Starlette (reference)": [*UVICORN, "--backlog", "{backlog}", "starlette_app:app"],
}
CHAT_GEVENT = [*CAPACITY_SERVERS["gunicorn -k gevent -w 1"][:-1], "stream_server_chat:app"]
CHAT_UVICORN = [*UVICORN, "--backlog", "{backlog}", "chat_starlette_app:app"]
FANOUT_FLASK = "Redis, 2 x gunicorn -k gevent -w 1"
FANOUT_REFERENCE = "reference: Redis, 2 x uvicorn + Starlette + redis.asyncio"
FANOUT_SETUPS = {  # name: command, instances, whether they share a redis-server
    FANOUT_FLASK: (CHAT_GEVENT, 2, True),
    "in-process broker, 1 x gunicorn -k gevent -w 1": (CHAT_GEVENT, 1, False),
    FANOUT_REFERENCE: (CHAT_UVICORN, 2, True),
}
# The dashboard: each gunicorn worker runs its own sampler, for its own viewers (step 10).
DASHBOARD = [*SERVERS[GEVENT][:-1], "-w", "{workers}", "--worker-connections", "{connections}"]
DASHBOARD += ["--backlog", "{backlog}", "stream_server_dashboard:app"]
DASHBOARD_SETUPS = {"1 x gunicorn -k gevent -w 1": 1, "gunicorn -k gevent -w 2, a sampler each": 2}
DASHBOARD_EVERY = 0.1  # seconds between two samples (DASHBOARD_EVERY)
STALLED = 10  # one dashboard viewer in STALLED reads nothing at all
# Steps 9 and 10 against their peers, what users would build instead: uvicorn + Starlette +
# sse-starlette (bench/requirements.txt, Python 3.11 or later), one process each.
HAS_SSE_STARLETTE = HAS_UVICORN and importlib.util.find_spec("sse_starlette") is not None
LLM_STEP, LLM_PEER = "step 9, gunicorn -k gevent -w 1", "peer: uvicorn + sse-starlette"
COMPLETION_SERVERS = {  # name: command; the step only once it is in the repository
    LLM_STEP: [*CAPACITY_SERVERS["gunicorn -k gevent -w 1"][:-1], "stream_server_llm:app"],
    LLM_PEER: [*UVICORN, "--backlog", "{backlog}", "llm_starlette_app:app"],
}
PACE = 20.0  # tokens a second, each completion
TOKENS = 30  # tokens a completion, at most (max_tokens): 1.5 s at PACE
VIEW_STEP = "step 10, gunicorn -k gevent -w 1"
VIEW_PEER = "peer: uvicorn + sse-starlette, one sampler"
VIEWER_SERVERS = {
    VIEW_STEP: [*CAPACITY_SERVERS["gunicorn -k gevent -w 1"][:-1], "stream_server_dashboard:app"],
    VIEW_PEER: [*UVICORN, "--backlog", "{backlog}", "dashboard_starlette_app:app"],
}
REDIS = ["redis-server", "--bind", HOST, "--port", "{port}", "--save", "", "--appendonly", "no"]
REDIS += ["--dir", "{folder}", "--protected-mode", "no", "--loglevel", "warning"]
STREAM_TIMEOUT = 60.0  # seconds any one measured stream may take before it counts as an error
FAST = 4  # streams at interval=0 that run while first_chunk_beside_fast_streams measures
OPEN_TIMEOUT = 60.0  # seconds for a ladder's rung to open all its streams
SPARE_FILES = 200  # open files the client keeps for itself besides its streams
GRACE = 5.0  # seconds subscribers may take, after the last POST, to receive everything
LANES = 4  # the poster's threads


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free loopback port, stopped by the PID this script started.
    `command` may name {module}, {port} and any of `fill`; `env` is added to this environment
    (a value of None removes the variable)."""

    def __init__(
        self, command: list[str], module: str = "", env: dict | None = None, **fill
    ) -> None:
        self.port = free_port()
        argv = [part.format(module=module, port=self.port, **fill) for part in command]
        environment = {**os.environ, **(env or {})}
        environment = {name: value for name, value in environment.items() if value is not None}
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while not self._accepts():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{' '.join(argv)} did not start")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex((HOST, self.port)) == 0

    def _processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the server and its workers, in bytes."""
        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker may just have exited
                total += process.memory_info().rss
        return total

    def cpu(self) -> float:
        """CPU seconds (user and system) that the server and its workers have used so far."""
        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def get_request(path: str, headers: dict | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def stream(port: int, path: str) -> tuple[float, list[float], bytes]:
    """GET `path`; return when the request went out, when each chunk arrived, and the body."""
    with (
        socket.create_connection((HOST, port), timeout=STREAM_TIMEOUT) as sock,
        sock.makefile("rb") as wire,
    ):
        sock.sendall(get_request(path))
        sent = time.perf_counter()
        if b" 200 " not in (status := wire.readline()):
            raise RuntimeError(status.decode().strip())
        while wire.readline() not in (b"\r\n", b""):  # skip the headers
            pass
        arrivals, body = [], bytearray()
        while size := int(wire.readline().split(b";")[0], 16):  # "" (cut short) raises
            body += wire.read(size + 2)
            arrivals.append(time.perf_counter())
        return sent, arrivals, bytes(body)


def fast_read(port: int, path: str) -> float:
    """Read a whole stream in large blocks, without parsing it; return the seconds it took."""
    with socket.create_connection((HOST, port), timeout=STREAM_TIMEOUT) as sock:
        sock.sendall(get_request(path))
        started = time.perf_counter()
        tail = b""
        while block := sock.recv(1 << 16):
            tail = (tail + block)[-7:]
            if time.perf_counter() - started > STREAM_TIMEOUT:
                raise TimeoutError(f"{path} took over {STREAM_TIMEOUT} s")
        if not tail.endswith(b"0\r\n\r\n"):
            raise RuntimeError("stream ended without its final chunk")
        return time.perf_counter() - started


def first_chunk_and_gaps(port: int, runs: int) -> tuple[float, float]:
    """Median ms to the first chunk, and mean ms by which paced gaps miss 100 ms."""
    firsts, misses = [], []
    for run in range(runs):
        sent, arrivals, _ = stream(port, f"/stream/bench{run}?count=6&interval=0.1")
        firsts.append((arrivals[0] - sent) * 1000)
        misses += [abs(b - a - 0.1) * 1000 for a, b in itertools.pairwise(arrivals)]
    return statistics.median(firsts), statistics.mean(misses)


class PeakMemory:
    """Samples the servers' total RSS in a thread, every 0.1 s, while the `with` block runs."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers, self.done = servers, threading.Event()
        self.baseline = self.peak = sum(server.rss() for server in servers)
        self.thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self.done.wait(0.1):
            self.peak = max(self.peak, sum(server.rss() for server in self.servers))

    def __enter__(self) -> "PeakMemory":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)


def rate_and_memory(server: Server, count: int, runs: int) -> tuple[list[float], float]:
    """Chunks per second of each of `runs` unpaced streams, read one after another, and the
    server's peak RSS growth meanwhile, in MB."""
    path = f"/stream/rate?count={count}&interval=0"
    with PeakMemory([server]) as memory:
        rates = [count / fast_read(server.port, path) for _ in range(runs)]
    return rates, memory.growth / 1e6


# The light client: plain non-blocking sockets and `selectors` on one thread, no thread per
# stream. It shares the machine's cores with the servers it measures, so it must cost little:
# an asyncio client's own work added about 0.07 s to 500 one-second streams.


def error_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, str(error))  # "ECONNREFUSED", "EMFILE"...


class Stream:
    """One connection of the light client: the request it sends, and what it made of the
    answer. `opened` is when the answer's first payload came (a chunk, an event), `error` why
    the stream failed, if it did: refused, reset, not 200, cut short, or still open at the end."""

    ends_by_itself = True  # False for a subscription, which the client closes when it is done

    def __init__(self, port: int, request: bytes) -> None:
        self.port, self.request = port, request
        self.sent: float | None = None  # when the request went out
        self.opened: float | None = None
        self.error: str | None = None
        self._head: bytes | None = b""  # the answer's first bytes, until its status is checked

    def receive(self, block: bytes, now: float) -> bool:
        """Take the next block read from the socket (b"" when the server closed it); return
        True once the stream is over."""
        if self._head is not None:
            self._head += block
            if block and len(self._head) < len(b"HTTP/1.1 200 "):
                return False
            if not self._head.startswith(b"HTTP/1.1 200 "):
                status = self._head.split(b"\r\n")[0].decode(errors="replace")
                self.error = f"answered {status!r}" if status else "closed before answering"
                return True
            block, self._head = self._head, None
        if not block:
            self.error = self.error or self.cut_short()
            return True
        return self.payload(block, now)

    def payload(self, block: bytes, now: float) -> bool:
        raise NotImplementedError

    def cut_short(self) -> str | None:
        """Why the server's closing the connection now is an error, if it is."""
        return "cut short"


class ChunkStream(Stream):
    """A stream of step 2: `count` lines, one per chunk; it has to end with the final chunk.
    Records when each chunk arrived."""

    MARK = b"\nchunk "  # each of step 2's lines opens a chunk: "1a\r\nchunk 1 of 30 for u1\n\r\n"
    END = b"\r\n0\r\n\r\n"  # the final chunk

    def __init__(self, port: int, path: str, count: int) -> None:
        super().__init__(port, get_request(path))
        self.count = count
        self.arrivals: list[float] = []
        self._tail = b""  # the last bytes read: a mark may straddle two blocks

    def payload(self, block: bytes, now: float) -> bool:
        data = self._tail + block
        self.arrivals += [now] * data.count(self.MARK)
        if self.opened is None and self.arrivals:
            self.opened = now
        self._tail = data[-(len(self.MARK) - 1) :]  # too short to hold a mark counted already
        if not data.endswith(self.END):
            return False
        if len(self.arrivals) != self.count:
            self.error = f"{len(self.arrivals)} of {self.count} chunks"
        return True

    def cut_short(self) -> str:
        return f"cut short after {len(self.arrivals)} of {self.count} chunks"


class EventStream(Stream):
    """A subscription to a room of the chat step: opened by its `retry:` line; records the id
    of each message event and when it arrived. Any other event (overflow, error, reset) or
    the server closing it ends it with an error: a subscriber never leaves by itself."""

    ends_by_itself = False
    ID = re.compile(rb"^id: ([0-9]+-[0-9]+)\r?$", re.MULTILINE)
    EVENT = re.compile(rb"^event: (\w+)", re.MULTILINE)

    def __init__(self, port: int, path: str, headers: dict) -> None:
        super().__init__(port, get_request(path, headers))
        self.ids: list[bytes] = []
        self.times: list[float] = []
        self._partial = b""  # a line not complete yet

    def payload(self, block: bytes, now: float) -> bool:
        data = self._partial + block
        cut = data.rfind(b"\n") + 1
        data, self._partial = data[:cut], data[cut:]
        if self.opened is None and b"retry:" in data:
            self.opened = now
        for match in self.ID.finditer(data):
            self.ids.append(match[1])
            self.times.append(now)
        if other := [kind for kind in self.EVENT.findall(data) if kind != b"message"]:
            self.error = f"event: {other[0].decode()}"
            return True
        return False

    def cut_short(self) -> str:
        return f"closed by the server after {len(self.ids)} messages"


class SampleStream(Stream):
    """A viewer of the dashboard step: opened by its `retry:` line; records the number of each
    sample and when it arrived. It never ends by itself: the server closing it is an error."""

    ends_by_itself = False
    ID = re.compile(rb"^id: ([0-9]+)\r?$", re.MULTILINE)
    TIME = re.compile(rb'^data: {"time": ([0-9.]+)', re.MULTILINE)  # when it was taken

    def __init__(self, port: int) -> None:
        super().__init__(port, get_request("/events"))
        self.ids: list[int] = []
        self.times: list[float] = []
        self.taken: list[float] = []  # each sample's own time (Unix seconds)
        self._partial = b""  # a line not complete yet

    def payload(self, block: bytes, now: float) -> bool:
        data = self._partial + block
        cut = data.rfind(b"\n") + 1
        data, self._partial = data[:cut], data[cut:]
        if self.opened is None and b"retry:" in data:
            self.opened = now
        for match in self.ID.finditer(data):
            self.ids.append(int(match[1]))
            self.times.append(now)
        self.taken += [float(match[1]) for match in self.TIME.finditer(data)]
        return False

    def cut_short(self) -> str:
        return f"closed by the server after {len(self.ids)} samples"


def post_request(path: str, body: dict, headers: dict) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class CompletionStream(Stream):
    """A streamed completion of step 9 or its peer: POSTs a question for `tokens` tokens and
    records when each token's chunk arrived. It has to end with `data: [DONE]` and the final
    chunk, with every token."""

    TOKEN = b'"delta": {"content": '  # a token's chunk (the first chunk has the role too)
    TEXT = re.compile(rb'"delta": {"content": "((?:[^"\\]|\\.)*)"')  # and the token itself
    END = b"\r\n0\r\n\r\n"  # the final chunk

    def __init__(self, port: int, question: str, tokens: int, headers: dict) -> None:
        body = {"model": "stand-in-1", "messages": [{"role": "user", "content": question}]}
        body |= {"stream": True, "max_tokens": tokens}
        super().__init__(port, post_request("/v1/chat/completions", body, headers))
        self.tokens = tokens
        self.arrivals: list[float] = []
        self.texts: list[bytes] = []  # each token, as JSON wrote it
        self.done = False
        self._partial, self._last = b"", b""  # a line not complete yet; the last bytes read

    def payload(self, block: bytes, now: float) -> bool:
        data = self._partial + block
        cut = data.rfind(b"\n") + 1
        data, self._partial = data[:cut], data[cut:]
        if self.opened is None and b"data: " in data:
            self.opened = now
        texts = self.TEXT.findall(data)
        self.arrivals += [now] * len(texts)
        self.texts += texts
        self.done = self.done or b"data: [DONE]" in data
        self._last = (self._last + block)[-len(self.END) :]
        if self._last != self.END:
            return False
        if not self.done or len(self.arrivals) != self.tokens:
            self.error = f"{len(self.arrivals)} of {self.tokens} tokens, [DONE] {self.done}"
        return True

    def cut_short(self) -> str:
        return f"cut short after {len(self.arrivals)} of {self.tokens} tokens"


def run_streams(
    streams: Sequence[Stream],
    deadline: float,
    window: int | None = None,
    tick: Callable[[float], bool] | None = None,
) -> None:
    """Open `streams` (at most `window` of them waiting for their first payload at a time)
    and read them all, on one thread, until each has ended, `deadline` (perf_counter) has
    come, or `tick` (called every 50 ms with the time) returns True. A stream that was not
    opened, or that should end by itself and has not, then counts as an error."""
    selector, waiting, opening = selectors.DefaultSelector(), collections.deque(streams), 0

    def close(sock: socket.socket, stream: Stream) -> None:
        nonlocal opening
        opening -= stream.opened is None
        selector.unregister(sock)
        sock.close()

    def start_more() -> None:
        nonlocal opening
        while waiting and (window is None or opening < window):
            stream = waiting.popleft()
            try:
                sock = socket.socket()  # EMFILE here: out of open files
            except OSError as error:
                stream.error = error_name(error)
                continue
            sock.setblocking(False)
            code = sock.connect_ex((HOST, stream.port))  # completes in the background
            if code not in (0, errno.EINPROGRESS):  # EADDRNOTAVAIL: out of local ports
                stream.error = errno.errorcode.get(code, str(code))
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_WRITE, stream)  # writable once connected
            opening += 1

    start_more()
    next_tick = time.perf_counter()
    while selector.get_map() or waiting:
        now = time.perf_counter()
        if now >= deadline:
            break
        if tick and now >= next_tick:
            if tick(now):
                break
            next_tick = now + 0.05
        for key, _ in selector.select(timeout=min(0.05, deadline - now)):
            sock, stream = key.fileobj, key.data
            try:
                if key.events == selectors.EVENT_WRITE:  # connected, or refused
                    if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError(code, os.strerror(code))
                    sock.sendall(stream.request)  # a few bytes into an empty send buffer
                    stream.sent = time.perf_counter()
                    selector.modify(sock, selectors.EVENT_READ, stream)
                    continue
                was_opening = stream.opened is None
                over = stream.receive(sock.recv(1 << 16), time.perf_counter())
                opening -= was_opening and stream.opened is not None
            except BlockingIOError:
                continue
            except OSError as error:  # refused or reset
                stream.error, over = error_name(error), True
            if over:
                close(sock, stream)
        start_more()
    for key in list(selector.get_map().values()):  # still open at the end
        stream = key.data
        if stream.opened is None:
            stream.error = "not open in time"
        elif stream.ends_by_itself:
            stream.error = "not over in time"
        close(key.fileobj, stream)
    for stream in waiting:
        stream.error = "never started"
    selector.close()


def first_chunk_beside_fast_streams(port: int, fast: int, probes: int) -> float:
    """The longest ms from a request to its first chunk while `fast` streams at interval=0 run,
    each read as fast as it comes, so that no write of theirs ever waits for its client. A
    worker that lets such a stream run without a break keeps every other client waiting.

    One thread and `selectors`, as in concurrent_streams: the client must not be what makes
    the probe wait."""
    selector, flowing, waits = selectors.DefaultSelector(), set(), []
    deadline = time.perf_counter() + STREAM_TIMEOUT
    try:
        for stream_id in range(fast):
            sock = socket.create_connection((HOST, port))
            sock.sendall(get_request(f"/stream/fast{stream_id}?count=1000000&interval=0"))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, stream_id)
        probe, sent = None, 0.0
        while len(waits) < probes:
            if time.perf_counter() > deadline:
                if probe is None:
                    raise RuntimeError(f"no fast stream began within {STREAM_TIMEOUT} s")
                waits.append((time.perf_counter() - sent) * 1000)  # and still waiting
                break
            if probe is None and flowing:  # the fast streams have begun: send the next probe
                probe = socket.create_connection((HOST, port))
                probe.sendall(get_request(f"/stream/probe{len(waits)}?count=1"))
                sent, received = time.perf_counter(), bytearray()
                probe.setblocking(False)
                selector.register(probe, selectors.EVENT_READ, "probe")
            for key, _ in selector.select(timeout=1):
                try:
                    block = key.fileobj.recv(1 << 16)
                except ConnectionError:  # reset: as good as closed
                    block = b""
                if key.data != "probe":
                    flowing.add(key.data)
                    if not block:  # this one has ended (the others are still running)
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                received += block
                if b"chunk 1 of 1" in received:
                    waits.append((time.perf_counter() - sent) * 1000)
                elif block:
                    continue  # more to come
                selector.unregister(probe)
                probe.close()
                probe = None
        return max(waits)
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()


def concurrent_streams(port: int, users: int) -> tuple[float, int]:
    """Wall seconds for `users` one-second streams started at once, and how many failed."""
    streams = [
        ChunkStream(port, f"/stream/user{user}?count=2&interval=1", 2) for user in range(users)
    ]
    started = time.perf_counter()
    run_streams(streams, started + STREAM_TIMEOUT)
    return time.perf_counter() - started, sum(stream.error is not None for stream in streams)


def warm_up(port: int) -> None:
    """The first request of each worker imports and caches: made before anything is timed."""
    for worker in range(4):
        stream(port, f"/stream/warmup{worker}?count=1")


def measure(name: str, command: list[str], quick: bool) -> dict:
    print(f"streams: {name} ...", file=sys.stderr, flush=True)
    with Server(command, "stream_server_multiuser") as server:
        warm_up(server.port)
        first, gap = first_chunk_and_gaps(server.port, runs=3 if quick else 10)
        rates, memory = rate_and_memory(server, count=20_000 if quick else 100_000, runs=3)
        row = {"server": name, "first chunk ms": first, "gap error ms": gap}
        # The best of the runs: the one least disturbed by anything else on the machine.
        row |= {"chunks/s": max(rates), "chunks/s, runs": rates, "memory growth MB": memory}
        row[f"first chunk beside {FAST} fast ms"] = first_chunk_beside_fast_streams(
            server.port, FAST, probes=3 if quick else 10
        )
        for users in (10, 50) if quick else (10, 100, 500):
            runs = [concurrent_streams(server.port, users) for _ in range(1 if quick else 3)]
            row[f"{users} streams s"] = statistics.median(seconds for seconds, _ in runs)
            row[f"{users} errors"] = sum(errors for _, errors in runs)
        return row


# Capacity and fan-out: what they need from the machine, and what limits them.


def open_file_limit(wanted: int) -> tuple[int, str]:
    """Raise this process's soft limit of open files towards the hard limit, as far as
    `wanted` streams need. Returns how many streams fit, and what was done. The servers it
    starts inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + SPARE_FILES
    if soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):  # above the kernel's own ceiling
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    note = f"open files: soft limit {soft:,}, hard limit {hard:,}"
    if soft - SPARE_FILES < wanted:
        note += f": the hard limit caps a rung at {soft - SPARE_FILES:,} streams"
    return soft - SPARE_FILES, note


def network_limits() -> dict:
    """The loopback limits that many connections can hit: local ports, listen queues."""
    limits = {}
    with contextlib.suppress(OSError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        limits["local ports"] = int(high) - int(low) + 1
    with contextlib.suppress(OSError):
        limits["somaxconn"] = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return limits


def listen_drops() -> int | None:
    """Connections the kernel has dropped because a listen queue was full (Linux)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return None


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max (nearest rank), or NaN for no values."""
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[int(0.99 * len(ordered))], ordered[-1]


def errors_by_kind(streams: Sequence[Stream]) -> dict[str, int]:
    return dict(collections.Counter(s.error for s in streams if s.error).most_common())


class Usage:
    """CPU used between start and stop, as a percentage of one core (the machine has
    psutil.cpu_count() of them): by each group of servers, by this client, and by everything
    else on the machine (other programs, the kernel's work for all of them)."""

    def __init__(self, groups: dict[str, Sequence[Server]]) -> None:
        self.groups = groups
        self.wall, self.client, self.busy = time.perf_counter(), time.process_time(), busy()
        self.seconds = {name: sum(s.cpu() for s in group) for name, group in groups.items()}

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall
        for name, group in self.groups.items():
            self.seconds[name] = sum(s.cpu() for s in group) - self.seconds[name]
        self.client = time.process_time() - self.client
        other = busy() - self.busy - self.client - sum(self.seconds.values())
        shares = {f"{name} CPU %": seconds for name, seconds in self.seconds.items()}
        shares |= {"client CPU %": self.client, "other CPU %": max(0.0, other)}
        return {name: 100 * seconds / wall for name, seconds in shares.items()}


def busy() -> float:
    """CPU seconds the whole machine has spent on anything so far (all cores)."""
    times = psutil.cpu_times()
    waiting = times.idle + getattr(times, "iowait", 0) + getattr(times, "steal", 0)
    return sum(times) - waiting - getattr(times, "guest", 0) - getattr(times, "guest_nice", 0)


def capacity(
    name: str, command: list[str], count: int, args: argparse.Namespace, window: int | None
) -> dict:
    """`count` paced streams of step 2 at once on one server process, at most `window` of
    them opening at a time."""
    print(f"capacity: {name}, {count:,} streams ...", file=sys.stderr, flush=True)
    with Server(
        command, "stream_server_multiuser", connections=count + 100, backlog=args.backlog
    ) as server:
        warm_up(server.port)
        query = f"count={args.chunks}&interval={args.interval}"
        streams = [
            ChunkStream(server.port, f"/stream/c{n}?{query}", args.chunks) for n in range(count)
        ]
        drops, usage = listen_drops(), Usage({"server": [server]})
        with PeakMemory([server]) as memory:
            started = time.perf_counter()
            deadline = started + OPEN_TIMEOUT + args.chunks * args.interval + 30
            run_streams(streams, deadline, window)
        errors = sum(each.error is not None for each in streams)
        row = {"server": name, "streams": count, "opening at once": window or "all"}
        row |= {"completed": count - errors, "errors": errors}
        opened = [each.opened for each in streams if each.opened is not None]
        all_open = max(opened, default=started)
        row["open s"] = all_open - started
        row["listen drops"] = None if drops is None else listen_drops() - drops
        row["RSS KB/stream"] = memory.growth / 1024 / count
        # Each chunk's lateness against its schedule, the first chunk's arrival plus `interval`
        # for each chunk since, once every stream is open.
        # And how much longer than `interval` each gap between two chunks took: a stream
        # delayed once stays late by as much, since each pause starts when a chunk has gone.
        lateness, gaps = [], []
        for each in streams:
            for number, arrival in enumerate(each.arrivals[1:], 1):
                due = each.arrivals[0] + number * args.interval
                if due >= all_open:
                    lateness.append(arrival - due)
                    gaps.append(arrival - each.arrivals[number - 1] - args.interval)
        p50, p99, most = percentiles(lateness)
        row |= {"late p50 ms": p50 * 1000, "late p99 ms": p99 * 1000, "late max ms": most * 1000}
        row["gap over p99 ms"] = percentiles(gaps)[1] * 1000
        row |= usage.stop()
        row["error kinds"] = errors_by_kind(streams)
        return row


class Poster:
    """Posts `count` messages, `rate` a second on schedule, to the instances in turn; records
    each message's id and when its POST's response came. The messages take turns over LANES
    threads, each with its own keep-alive connections, so that one slow answer does not hold
    back the next message: the rate holds as long as answers take less than LANES / rate."""

    def __init__(
        self, ports: list[int], token: str, rate: float, count: int, room: str = "bench"
    ) -> None:
        self.ports, self.rate, self.count = ports, rate, count
        self.path = f"/rooms/{room}/messages"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.posted: dict[str, float] = {}  # message id: when the response came
        self.durations: list[float] = []  # seconds each POST took
        self.errors = 0
        self.started = self.finished = 0.0
        self.lock, self.done = threading.Lock(), threading.Event()
        lanes = min(LANES, count)
        self.threads = [threading.Thread(target=self._lane, args=(n, lanes)) for n in range(lanes)]
        self.running = lanes

    def start(self) -> None:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            if thread.ident is not None:
                thread.join()

    def run(self) -> None:
        self.start()
        self.join()

    def _lane(self, first: int, lanes: int) -> None:
        connections = {
            port: http.client.HTTPConnection(HOST, port, timeout=10) for port in self.ports
        }
        try:
            for number in range(first, self.count, lanes):
                if (pause := self.started + number / self.rate - time.perf_counter()) > 0:
                    time.sleep(pause)
                connection = connections[self.ports[number % len(self.ports)]]
                body = json.dumps({"text": f"bench message {number}"})
                sent = time.perf_counter()
                try:
                    connection.request("POST", self.path, body, self.headers)
                    response = connection.getresponse()
                    answer = response.read()
                    now = time.perf_counter()
                    if response.status != 201:
                        raise ValueError(f"answered {response.status}")
                    message_id = json.loads(answer)["id"]
                except (OSError, http.client.HTTPException, ValueError, KeyError):
                    connection.close()  # the next request opens a new connection
                    with self.lock:
                        self.errors += 1
                    continue
                with self.lock:
                    self.posted[message_id] = now
                    self.durations.append(now - sent)
        finally:
            for connection in connections.values():
                connection.close()
            with self.lock:
                self.running -= 1
                if not self.running:
                    self.finished = time.perf_counter()
                    self.done.set()


def check_deliveries(posted: Sequence[str], received: Sequence[Sequence[str]]) -> dict[str, int]:
    """Over all subscribers: messages posted that one did not receive (lost), received more
    than once (duplicated), received that were never posted (unexpected), and received after a
    later one (out of order)."""
    wanted = set(posted)
    counts = dict.fromkeys(("lost", "duplicated", "unexpected", "out of order"), 0)
    for ids in received:
        seen = set(ids)
        counts["lost"] += len(wanted - seen)
        counts["duplicated"] += len(ids) - len(seen)
        counts["unexpected"] += len(seen - wanted)
        order = [tuple(map(int, message_id.split("-"))) for message_id in ids]
        counts["out of order"] += sum(b < a for a, b in itertools.pairwise(order))
    return counts


def access_token(key: str, user: str) -> str:
    """A token of the kind the chat step mints, signed with the key the bench gave it."""
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + 3600}
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": "at+jwt"})


def fanout(name: str, count: int, args: argparse.Namespace) -> dict:
    """`count` subscribers of one room, split over the setup's instances, and one poster."""
    print(f"fan-out: {name}, {count:,} subscribers ...", file=sys.stderr, flush=True)
    command, instances, with_redis = FANOUT_SETUPS[name]
    key = secrets.token_urlsafe(32)
    # Stopped in reverse: the step's servers, then Redis, and only then Redis's folder goes.
    with contextlib.ExitStack() as cleanup:
        env = {"JWT_SECRET_KEY": key, "REDIS_URL": None}
        # One user reads on every stream and one posts them all: far past the chat step's
        # bounds on one user (10 streams, 20 posts in 4 s), which would refuse them with 429.
        env |= {"CHAT_STREAMS": str(count), "CHAT_POSTS": "100000 per 1 second"}
        per_instance = -(-count // instances)
        if with_redis:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-"))
            redis = cleanup.enter_context(Server(REDIS, folder=folder))
            # redis-py's pool holds 100 connections unless the URL says otherwise; each
            # subscriber joining takes one for a moment, and many join at once.
            pool = per_instance + 100
            env["REDIS_URL"] = f"redis://{HOST}:{redis.port}/0?max_connections={pool}"
        options = {"connections": per_instance + 100, "backlog": args.backlog}
        servers = [
            cleanup.enter_context(Server(command, env=env, **options)) for _ in range(instances)
        ]
        ports = [server.port for server in servers]
        # No warm-up: latency counts from the room's first message, the one a real room's
        # users wait for too (whatever its server does the first time is part of it).
        headers = {"Authorization": f"Bearer {access_token(key, 'reader')}"}
        path = "/rooms/bench/events"
        streams = [EventStream(ports[n % len(ports)], path, headers) for n in range(count)]
        token, messages = access_token(key, "poster"), round(args.rate * args.seconds)
        poster = Poster(ports, token, args.rate, messages)
        groups = {"server": servers} | ({"Redis": [redis]} if with_redis else {})
        drops, usage = listen_drops(), Usage(groups)
        subscribed: list[EventStream] = []  # those open when the poster began
        posting: list[Usage] = []  # CPU used from the first POST on
        times = {"begun": time.perf_counter()}

        def tick(now: float) -> bool:
            if not posting:  # the poster begins once every subscriber is open (or failed)
                if all(s.opened or s.error for s in streams) or now > times["begun"] + OPEN_TIMEOUT:
                    times["open"] = now
                    subscribed.extend(s for s in streams if s.opened and not s.error)
                    posting.append(Usage(groups))
                    poster.start()
                return False
            if not poster.done.is_set():
                return False
            wanted = len(subscribed) * len(poster.posted)
            return sum(len(s.ids) for s in subscribed) >= wanted or now > poster.finished + GRACE

        with PeakMemory(servers) as memory:
            run_streams(
                streams,
                times["begun"] + OPEN_TIMEOUT + args.seconds + GRACE + 30,
                args.window,
                tick,
            )
        poster.join()
        counted = set(subscribed)
        for stream in streams:
            if stream.opened and stream not in counted and not stream.error:
                stream.error = "not open when posting began"
        received = [[i.decode() for i in stream.ids] for stream in subscribed]
        checked = check_deliveries(list(poster.posted), received)
        latency, early = [], []  # all of them; those of the first second's messages
        by_order = sorted(poster.posted, key=lambda i: tuple(map(int, i.split("-"))))
        first_second = set(by_order[: max(1, round(args.rate))])
        for ids, stream in zip(received, subscribed, strict=True):
            for message_id, at in zip(ids, stream.times, strict=True):
                if message_id in poster.posted:
                    latency.append(at - poster.posted[message_id])
                    if message_id in first_second:
                        early.append(latency[-1])
        deliveries = sum(len(ids) for ids in received)
        # The rate at which messages reached subscribers: from the first receipt to the last,
        # the deliveries after the first message's. If latency held steady, that is
        # subscribers x rate; if messages piled up on the way, it is less.
        ends = [(s.times[0], s.times[-1]) for s in subscribed if s.times]
        first, last = min(e[0] for e in ends) if ends else 0, max(e[1] for e in ends) if ends else 0
        rate = (deliveries - len(ends)) / (last - first) if last > first else float("nan")
        p50, p99, most = percentiles(latency)
        row = {
            "setup": name,
            "subscribers": count,
            "posted": len(poster.posted),
            "post errors": poster.errors,
            "post rate/s": len(poster.posted) / max(poster.finished - poster.started, 1e-9),
            "POST p99 ms": percentiles(poster.durations)[1] * 1000,
            "errors": sum(stream.error is not None for stream in streams),
            **checked,
            "deliveries": deliveries,
            "deliveries/s": rate,
            "latency p50 ms": p50 * 1000,
            "latency p99 ms": p99 * 1000,
            "latency max ms": most * 1000,
            "first second's p99 ms": percentiles(early)[1] * 1000,
            "open s": times.get("open", times["begun"]) - times["begun"],
            "listen drops": None if drops is None else listen_drops() - drops,
            "RSS KB/subscriber": memory.growth / 1024 / count,
        }
        if posting and deliveries:  # what one delivery costs the app servers
            posting[0].stop()
            row["server CPU µs/delivery"] = 1e6 * posting[0].seconds["server"] / deliveries
        row |= usage.stop()
        row["error kinds"] = errors_by_kind(streams)
        return row


# The report: tables, targets, the machine.


def get_status(port: int) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/status")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def dashboard(name: str, count: int, args: argparse.Namespace) -> dict:
    """`count` viewers of the dashboard step, one in STALLED of them reading nothing, for
    `args.seconds` once all are open."""
    print(f"dashboard: {name}, {count:,} viewers ...", file=sys.stderr, flush=True)
    env = {"DASHBOARD_EVERY": str(DASHBOARD_EVERY)}
    fill = {"workers": DASHBOARD_SETUPS[name], "connections": count + 100, "backlog": args.backlog}
    with Server(DASHBOARD, env=env, **fill) as server, contextlib.ExitStack() as stalled:
        for _ in range(8):  # each worker's first request imports, and starts its sampler
            get_status(server.port)
        for _ in range(count // STALLED):  # they ask, then never read a byte
            sock = stalled.enter_context(socket.create_connection((HOST, server.port)))
            sock.sendall(get_request("/events"))
        viewers = [SampleStream(server.port) for _ in range(count - count // STALLED)]
        usage, opened = Usage({"server": [server]}), []

        def enough(now: float) -> bool:  # every viewer open (or failed), then `seconds` more
            if not opened and all(v.opened or v.error for v in viewers):
                opened.append(now)
            return bool(opened) and now >= opened[0] + args.seconds

        with PeakMemory([server]) as memory:
            started = time.perf_counter()
            run_streams(viewers, started + OPEN_TIMEOUT + args.seconds, args.window, enough)
        row = {"setup": name, "viewers": count, "stalled": count // STALLED}
        errors = sum(viewer.error is not None for viewer in viewers)
        row |= {"reading, errors": errors, "open s": (opened or [started])[0] - started}
        # Once all are open: the samples each viewer got, their gaps, and the numbers skipped.
        rates, gaps, skipped = [], [], 0
        for viewer in viewers:
            pairs = zip(viewer.ids, viewer.times, strict=True)
            got = [(n, t) for n, t in pairs if opened and t >= opened[0]]
            if len(got) > 1:
                rates.append((got[-1][0] - got[0][0]) / (got[-1][1] - got[0][1]))
                gaps += [b[1] - a[1] for a, b in itertools.pairwise(got)]
                skipped += sum(b[0] - a[0] - 1 for a, b in itertools.pairwise(got))
        row["samples/s"] = statistics.median(rates) if rates else float("nan")
        p50, p99, most = percentiles(gaps)
        row |= {"gap p50 ms": p50 * 1000, "gap p99 ms": p99 * 1000, "gap max ms": most * 1000}
        row["skipped"] = skipped
        row["RSS KB/viewer"] = memory.growth / 1024 / count
        row |= usage.stop()
        row["error kinds"] = errors_by_kind(viewers)
        return row


# Steps 9 and 10 against their peers.


def llm_env(key: str, at_once: int) -> dict:
    """The step's settings (its peer reads the same): the pace, no first-token delay (the time
    to first token is then the server's own), and the per-user limit out of the way."""
    env = {"JWT_SECRET_KEY": key, "LLM_AT_ONCE": str(at_once), "LLM_UPSTREAM": None}
    return env | {"LLM_TOKENS_PER_SECOND": f"{PACE:g}", "LLM_DELAY": "0"}


def token_figures(streams: Sequence[CompletionStream]) -> dict:
    """Time to first token (from the request), each token's lateness against its pace (the
    stream's first token, plus 1 / PACE s per token since), and the tokens delivered."""
    first, late = [], []
    for each in streams:
        if each.arrivals and each.sent is not None:
            first.append(each.arrivals[0] - each.sent)
            late += [t - each.arrivals[0] - n / PACE for n, t in enumerate(each.arrivals)]
    row = {"first token p50 ms": percentiles(first)[0] * 1000}
    row["first token p99 ms"] = percentiles(first)[1] * 1000
    p50, p99, most = percentiles(late)
    row |= {"late p50 ms": p50 * 1000, "late p99 ms": p99 * 1000, "late max ms": most * 1000}
    return row | {"tokens": sum(len(each.arrivals) for each in streams)}


def completions(name: str, count: int, args: argparse.Namespace) -> dict:
    """`count` streamed completions at once on one process of step 9 or of its peer."""
    print(f"completions: {name}, {count:,} at once ...", file=sys.stderr, flush=True)
    key = secrets.token_urlsafe(32)
    options = {"connections": count + 100, "backlog": args.backlog}
    with Server(COMPLETION_SERVERS[name], env=llm_env(key, count), **options) as server:
        headers = {"Authorization": f"Bearer {access_token(key, 'bench')}"}
        # One completion first: a worker's first one takes 0.6 s more (its first imports),
        # which would be the time to first token of every stream that starts with it.
        run_streams(
            [CompletionStream(server.port, "warm up", 2, headers)], time.perf_counter() + 30
        )
        streams = [
            CompletionStream(server.port, f"question {n}", TOKENS, headers) for n in range(count)
        ]
        usage = Usage({"server": [server]})
        with PeakMemory([server]) as memory:
            started = time.perf_counter()
            run_streams(streams, started + OPEN_TIMEOUT + TOKENS / PACE + 30, args.window)
        errors = sum(each.error is not None for each in streams)
        row = {"server": name, "completions": count, "completed": count - errors}
        row |= {"errors": errors, **token_figures(streams)}
        row["RSS KB/stream"] = memory.growth / 1024 / count
        shares = usage.stop()
        row["server CPU µs/token"] = 1e6 * usage.seconds["server"] / max(row["tokens"], 1)
        return row | shares | {"error kinds": errors_by_kind(streams)}


def status_of(port: int, headers: dict) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", "/status", headers=headers)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class RecordingUpstream:
    """An OpenAI-compatible upstream in this process, for the relay part only: each request
    gets TOKENS tokens at PACE, each token a text of its own, and it notes when it wrote each
    (just before the write: a thread held up there makes the relay look slower, not faster)."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.written: dict[bytes, float] = {}  # token: when it was written
        self.numbers = itertools.count()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # closed: the part is over
            while True:
                connection, _ = self.listener.accept()
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(1 << 16) or b"\r\n\r\n"
            head, _, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *([0-9]+)", head)
            while length and len(body) < int(length[1]):
                body += connection.recv(1 << 16) or b"?" * int(length[1])
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            number, started = next(self.numbers), time.perf_counter()
            for token in range(TOKENS):
                time.sleep(max(0.0, started + token / PACE - time.perf_counter()))
                text = f"u{number}t{token} ".encode()
                event = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n' % text
                self.written[text] = time.perf_counter()
                connection.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            connection.sendall(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")

    def close(self) -> None:
        self.listener.close()


def relay(count: int, args: argparse.Namespace) -> dict:
    """Step 9 as a gateway (--upstream): what it adds to each token, `count` streams through it
    to an upstream that notes when it wrote each token; and, in front of another instance of
    step 9, how soon that upstream stops once a client leaves (the clients leave one at a time)."""
    print(f"relay: {count} streams ...", file=sys.stderr, flush=True)
    key = secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {access_token(key, 'bench')}"}
    options = {"connections": 2 * count + 100, "backlog": args.backlog}
    command = COMPLETION_SERVERS[LLM_STEP]
    with contextlib.ExitStack() as cleanup:
        recording = RecordingUpstream()
        cleanup.callback(recording.close)
        env = llm_env(key, 2 * count) | {"UPSTREAM_API_KEY": access_token(key, "gateway")}
        url = f"http://{HOST}:{recording.port}"
        gateway = cleanup.enter_context(Server(command, env=env | {"LLM_UPSTREAM": url}, **options))
        run_streams(
            [CompletionStream(gateway.port, "warm up", TOKENS, headers)], time.perf_counter() + 30
        )  # its first imports, as in completions()
        streams = [CompletionStream(gateway.port, f"q {n}", TOKENS, headers) for n in range(count)]
        run_streams(streams, time.perf_counter() + OPEN_TIMEOUT + TOKENS / PACE + 30)
        added = [
            at - recording.written[text]
            for each in streams
            for text, at in zip(each.texts, each.arrivals, strict=True)
            if text in recording.written
        ]
        row: dict = {"streams": count, "errors": sum(each.error is not None for each in streams)}
        p50, p99, most = percentiles(added)
        row |= {"tokens": len(added), "added p50 ms": p50 * 1000, "added p99 ms": p99 * 1000}
        row["added max ms"] = most * 1000
        # The clients leave one at a time, each once its answer has begun; the upstream's
        # /status says when its generation has ended.
        upstream = cleanup.enter_context(Server(command, env=env, **options))
        url = f"http://{HOST}:{upstream.port}"
        gateway = cleanup.enter_context(Server(command, env=env | {"LLM_UPSTREAM": url}, **options))
        body = {"model": "stand-in-1", "messages": [{"role": "user", "content": "long"}]}
        body |= {"stream": True, "max_tokens": 4000}  # 200 s at PACE: none ends by itself
        request = post_request("/v1/chat/completions", body, headers)
        socks, stops = [], []
        try:
            for _ in range(count):
                sock = cleanup.enter_context(socket.create_connection((HOST, gateway.port), 10))
                sock.sendall(request)
                socks.append(sock)
            for sock in socks:  # each until its first token
                seen = b""
                while CompletionStream.TOKEN not in seen:
                    seen = seen[-64:] + (sock.recv(1 << 16) or b"?" + CompletionStream.TOKEN)
            wait_until = time.perf_counter() + 60
            while status_of(upstream.port, headers)["generating"] < count:
                if time.perf_counter() > wait_until:
                    raise RuntimeError("relay: the upstream never had every stream open")
                time.sleep(0.01)
            for left, sock in enumerate(socks, 1):
                sock.close()
                closed = time.perf_counter()
                while status_of(upstream.port, headers)["generating"] > count - left:
                    if time.perf_counter() > closed + 5:
                        break
                stops.append(time.perf_counter() - closed)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            row["stop error"] = repr(error)
        p50, p99, most = percentiles(stops)
        row |= {"stops": len(stops), "stop p50 ms": p50 * 1000, "stop p99 ms": p99 * 1000}
        return row | {"stop max ms": most * 1000}


def viewers(name: str, count: int, stalled: int, args: argparse.Namespace) -> dict:
    """`count` viewers that read, and `stalled` that read nothing, of step 10 or of its peer,
    one sample a second, for `args.seconds` once all are open."""
    print(f"viewers: {name}, {count:,} + {stalled:,} stalled ...", file=sys.stderr, flush=True)
    env = {"DASHBOARD_EVERY": "1"}
    fill = {"connections": count + stalled + 100, "backlog": args.backlog}
    clock = time.time() - time.perf_counter()  # from perf_counter to Unix seconds
    with Server(VIEWER_SERVERS[name], env=env, **fill) as server, contextlib.ExitStack() as held:
        # One viewer first, gone at once: the step starts its sampler (and imports psutil) on
        # its first request, the peer at start; neither belongs in the memory per viewer.
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            sock.sendall(get_request("/events"))
            while b"retry:" not in sock.recv(1 << 16):
                pass
        for _ in range(stalled):  # they ask, then never read a byte
            sock = held.enter_context(socket.create_connection((HOST, server.port)))
            sock.sendall(get_request("/events"))
        readers = [SampleStream(server.port) for _ in range(count)]
        usage, opened, rss = Usage({"server": [server]}), [], []

        def enough(now: float) -> bool:  # every viewer open (or failed), then `seconds` more
            if not opened and all(v.opened or v.error for v in readers):
                opened.append(now)
                rss.append(server.rss())
            return bool(opened) and now >= opened[0] + args.seconds

        with PeakMemory([server]) as memory:
            started = time.perf_counter()
            run_streams(readers, started + OPEN_TIMEOUT + args.seconds, args.window, enough)
        rss.append(server.rss())
        row = {"server": name, "viewers": count, "stalled": stalled}
        row["errors"] = sum(viewer.error is not None for viewer in readers)
        row["open s"] = (opened or [started])[0] - started
        # From each sample taken once all were open to the last reader that got it.
        since, last, got = clock + (opened or [started])[0], {}, 0
        for viewer in readers:
            for taken, at in zip(viewer.taken, viewer.times, strict=False):  # in order
                if taken >= since:
                    last[taken] = max(last.get(taken, 0.0), clock + at - taken)
                    got += 1
        p50, p99, most = percentiles(list(last.values()))
        row |= {"samples": len(last), "skipped": len(last) * count - got}
        row |= {"to last viewer p50 ms": p50 * 1000, "to last viewer p99 ms": p99 * 1000}
        row["to last viewer max ms"] = most * 1000
        row["RSS KB/viewer"] = memory.growth / 1024 / (count + stalled)
        row["RSS growth watching MB"] = (rss[-1] - rss[0]) / 2**20 if len(rss) == 2 else None
        return row | usage.stop() | {"error kinds": errors_by_kind(readers)}


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + [
        "| " + " | ".join(format_cell(c, row.get(c)) for c in columns) + " |" for row in rows
    ]


def format_cell(column: str, value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return ", ".join(f"{kind}: {n:,}" for kind, n in value.items()) or "-"
    if isinstance(value, float):
        if value != value:  # NaN: nothing measured
            return "-"
        return (
            f"{value:,.0f}"
            if abs(value) >= 1000 or column.endswith(("/s", "%"))
            else f"{value:.2f}"
        )
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def check(text: str, figure: str, met: bool | None) -> dict:
    """A target: what it asks, what this run measured, and whether it is met (None: the run
    did not measure it)."""
    return {"target": text, "figure": figure, "met": None if met is None else bool(met)}


def targets(results: dict) -> list[dict]:
    checks = []
    if rows := results.get("streams"):
        by_name = {row["server"]: row for row in rows}
        gevent, reference = by_name[GEVENT], by_name.get(REFERENCE)
        most = max(int(key.split()[0]) for key in gevent if key.endswith("streams s"))
        text = f"{most} one-second streams on gunicorn gevent within 1.1 x uvicorn's time"
        if reference:
            ratio = gevent[f"{most} streams s"] / reference[f"{most} streams s"]
            figure = f"{gevent[f'{most} streams s']:.2f} s / {reference[f'{most} streams s']:.2f} s"
            checks.append(check(text, f"{figure} = {ratio:.2f} x", ratio <= 1.1))
        else:
            checks.append(check(text, "no uvicorn reference in this run", None))
        slowest = max(rows, key=lambda row: row["first chunk ms"])
        figure = f"slowest {slowest['first chunk ms']:.2f} ms, {slowest['server']}"
        checks.append(
            check("first chunk within 5 ms on every server", figure, slowest["first chunk ms"] <= 5)
        )
        beside = f"first chunk beside {FAST} fast ms"
        slowest = max(rows, key=lambda row: row[beside])
        figure = f"slowest {slowest[beside]:.0f} ms, {slowest['server']}"
        checks.append(
            check(
                f"first chunk within 500 ms beside {FAST} streams at interval=0, every server",
                figure,
                slowest[beside] <= 500,
            )
        )
        largest = max(rows, key=lambda row: row["memory growth MB"])
        figure = f"largest {largest['memory growth MB']:.2f} MB, {largest['server']}"
        checks.append(
            check(
                "memory growth under 10 MB on every server",
                figure,
                largest["memory growth MB"] < 10,
            )
        )
    if rows := results.get("capacity"):  # the ladder: streams opening as the run was told
        window = results["settings"]["window"] or "all"
        rows = [row for row in rows if row["opening at once"] == window]
        gevent = [row for row in rows if row["server"] != REFERENCE]
        top = max(gevent, key=lambda row: row["streams"])
        figure = (
            f"{top['streams']:,} streams: {top['completed']:,} completed, {top['errors']:,} errors"
        )
        checks.append(
            check(
                "10,000 streams on one gevent worker with 0 errors",
                figure,
                top["streams"] >= 10_000 and top["errors"] == 0,
            )
        )
        reference = [
            row for row in rows if row["server"] == REFERENCE and row["streams"] == top["streams"]
        ]
        text = "RSS per stream at most 0.8 x the uvicorn reference's"
        if reference:
            mine, theirs = top["RSS KB/stream"], reference[0]["RSS KB/stream"]
            figure = f"{top['streams']:,} streams: {mine:.1f} KB / {theirs:.1f} KB"
            figure += f" = {mine / theirs:.2f} x"
            checks.append(check(text, figure, mine <= 0.8 * theirs))
        else:
            checks.append(check(text, "no uvicorn reference in this run", None))
        figure = f"{top['streams']:,} streams on gevent: p99 {top['late p99 ms']:,.0f} ms"
        checks.append(
            check(
                "chunk lateness p99 within 500 ms once all streams are open",
                figure,
                top["late p99 ms"] <= 500,
            )
        )
    if rows := results.get("fanout"):
        flask = [row for row in rows if row["setup"] == FANOUT_FLASK]
        top = max(flask, key=lambda row: row["subscribers"]) if flask else None
        rate = results["settings"]["rate"]
        if top:
            wanted = top["subscribers"] * rate
            figure = (
                f"{top['subscribers']:,} x {rate:g}/s through Redis: {top['deliveries/s']:,.0f} "
                f"deliveries/s of {wanted:,.0f}, posts {top['post rate/s']:.1f}/s, lost "
                f"{top['lost']:,}, duplicated {top['duplicated']:,}, errors {top['errors']:,}"
            )
            # Sustained: every message posted on time and delivered once, at the rate it came
            # (within 5%: a p99 latency of 500 ms spreads ten seconds' deliveries over 10.5).
            met = (
                top["subscribers"] >= 5000
                and rate >= 10
                and top["post rate/s"] >= 0.95 * rate
                and top["deliveries/s"] >= 0.95 * wanted
                and top["lost"] == top["duplicated"] == top["errors"] == top["post errors"] == 0
            )
        else:
            figure, met = "the Redis setup did not run", None
        checks.append(
            check(
                "5,000 subscribers x 10 messages/s (50,000 deliveries/s, within 5%) sustained, "
                "0 lost, 0 duplicated",
                figure,
                met,
            )
        )
        full = top is not None and top["subscribers"] >= 5000  # the targets' size, measured
        figure = f"p99 {top['latency p99 ms']:,.0f} ms at {top['subscribers']:,}" if top else "-"
        met = top["latency p99 ms"] <= 500 if full else None
        checks.append(check("fan-out p99 latency within 500 ms at 5,000", figure, met))
        reference = [
            row
            for row in rows
            if row["setup"] == FANOUT_REFERENCE and top and row["subscribers"] == top["subscribers"]
        ]
        # Counted from the room's first message: each at most the reference's, in this run.
        for column, unit in (
            ("latency p50 ms", "ms"),
            ("latency p99 ms", "ms"),
            ("server CPU µs/delivery", "µs"),
        ):
            text = (
                f"fan-out {column.removesuffix(' ' + unit)} at 5,000 at most 1.0 x the reference's"
            )
            if top and reference and column in top and column in reference[0]:
                mine, theirs = top[column], reference[0][column]
                figure = f"{top['subscribers']:,}: {mine:,.1f} {unit} / {theirs:,.1f} {unit}"
                figure += f" = {mine / theirs:.2f} x"
                checks.append(check(text, figure, mine <= theirs if full else None))
            else:
                checks.append(check(text, "no reference in this run", None))
    checks += peer_targets(results)
    return checks


def against_peer(
    text: str, rows: list[dict], key: str, size: int, column: str, step: str, peer: str
) -> dict:
    """A target: `column` of the step at `size` at most 1.0 x its peer's, in this run."""
    mine = [row for row in rows if row["server"] == step and row[key] == size]
    theirs = [row for row in rows if row["server"] == peer and row[key] == size]
    if not (mine and theirs):
        return check(text, f"not measured at {size:,} in this run", None)
    if failed := [row["server"] for row in (*mine, *theirs) if row["errors"]]:
        return check(text, f"{size:,}: errors in {', '.join(failed)}: not comparable", None)
    a, b = mine[0][column], theirs[0][column]
    if a is None or b is None or a != a or b != b:  # NaN: nothing to compare
        return check(text, f"{size:,}: no figure ({a} / {b})", None)
    return check(text, f"{size:,}: {a:,.1f} / {b:,.1f} = {a / b:.2f} x", a <= b)


def peer_targets(results: dict) -> list[dict]:
    """Steps 9 and 10 against their peers (issue 24), only where this run measured them."""
    checks = []
    rows = results.get("completions", [])
    for size in (1000, 5000):
        for column in ("first token p99 ms", "late p99 ms", "RSS KB/stream", "server CPU µs/token"):
            text = f"step 9 at {size:,} completions: {column} at most 1.0 x the peer's"
            checks.append(against_peer(text, rows, "completions", size, column, LLM_STEP, LLM_PEER))
        mine = [row for row in rows if row["server"] == LLM_STEP and row["completions"] == size]
        figure = f"{mine[0]['errors']:,} errors" if mine else f"not measured at {size:,}"
        met = mine[0]["errors"] == 0 if mine else None
        checks.append(check(f"step 9 at {size:,} completions: 0 errors", figure, met))
    relayed = results.get("relay", [])
    row = relayed[0] if relayed and relayed[0]["streams"] >= 100 else None
    figure = f"{row['added p99 ms']:,.1f} ms" if row else "not measured with 100 streams"
    met = row["added p99 ms"] <= 5 and not row["errors"] if row else None
    checks.append(check("relay: latency added to each token, p99, at most 5 ms", figure, met))
    figure = f"{row['stop p99 ms']:,.0f} ms" if row else "not measured with 100 streams"
    met = row["stops"] == row["streams"] and row["stop p99 ms"] <= 100 if row else None
    checks.append(
        check("relay: the upstream stops within 100 ms of a client leaving, p99", figure, met)
    )
    rows = results.get("viewers", [])
    calm = [row for row in rows if not row["stalled"]]
    for size in (1000, 10_000):
        text = f"step 10 at {size:,} viewers: RSS per viewer at most 0.8 x the peer's"
        found = against_peer(text, calm, "viewers", size, "RSS KB/viewer", VIEW_STEP, VIEW_PEER)
        if found["met"] is not None:  # 0.8, not 1.0 (and the same rows, without errors)
            a, b = (
                r["RSS KB/viewer"]
                for n in (VIEW_STEP, VIEW_PEER)
                for r in calm
                if r["server"] == n and r["viewers"] == size
            )
            found["met"] = a <= 0.8 * b
        checks.append(found)
        mine = {
            bool(r["stalled"]): r for r in rows if r["server"] == VIEW_STEP and r["viewers"] == size
        }
        text = f"step 10 at {size:,}: with one viewer in ten stalled, the others' p99 within 1.1 x"
        if len(mine) == 2 and any(
            r["errors"] or r["RSS growth watching MB"] is None for r in mine.values()
        ):
            checks.append(check(text + ", memory flat", "viewers failed: not comparable", None))
        elif len(mine) == 2:
            a, b = mine[True]["to last viewer p99 ms"], mine[False]["to last viewer p99 ms"]
            figure = f"{a:,.0f} ms / {b:,.0f} ms = {a / b:.2f} x; memory while watching "
            figure += f"{mine[True]['RSS growth watching MB']:+.1f} MB"
            checks.append(
                check(
                    text + ", memory flat",
                    figure,
                    a <= 1.1 * b and abs(mine[True]["RSS growth watching MB"]) < 5,
                )
            )
        else:
            checks.append(check(text + ", memory flat", "not measured", None))
    top = [r for r in calm if r["server"] == VIEW_STEP and r["viewers"] >= 10_000]
    figure = f"{top[0]['to last viewer p99 ms']:,.0f} ms" if top else "not measured at 10,000"
    if top and top[0]["errors"]:
        figure += f", {top[0]['errors']:,} viewers failed"
    met = top[0]["to last viewer p99 ms"] <= 500 and not top[0]["errors"] if top else None
    checks.append(
        check(
            "step 10 at 10,000 viewers: sample to its last viewer, p99, within 0.5 s", figure, met
        )
    )
    return checks


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    return {
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory GiB": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "redis": (
            subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
            .stdout.split()[2]
            .removeprefix("v=")
            if shutil.which("redis-server")
            else None
        ),
        **network_limits(),
    }


def report(results: dict) -> list[str]:
    about, settings = results["machine"], results["settings"]
    window = format_cell("", settings["window"] or "all of them")
    ports, somaxconn = (format_cell("", about.get(key)) for key in ("local ports", "somaxconn"))
    lines = [
        f"Run {results['date']}{' (quick)' if settings['quick'] else ''} on {about['system']}, "
        f"{about['cpu']}, {about['cores']} cores, {about['memory GiB']} GiB, Python "
        f"{about['python']}, Redis {about['redis']}. Load average (1 min) "
        f"{results['load'][0]:.2f} at the start, {results['load'][1]:.2f} at the end: the "
        "client, the servers and anything else running share the cores (the CPU columns say "
        "who used what, in % of one core).",
        "",
        f"Limits: {settings['open files']}; {ports} local ports; somaxconn {somaxconn}; "
        "the servers' listen backlog "
        f"{settings['backlog']:,}; streams opening at once, at most: {window}.",
        "",
        "## Targets",
        "",
    ]
    lines += [
        f"- {'met' if t['met'] else 'NOT MEASURED' if t['met'] is None else 'NOT MET'}: "
        f"{t['target']} ({t['figure']})"
        for t in results["targets"]
    ]
    lines.append("")
    def section(title: str, rows: list[dict]) -> None:
        """A part's heading, then its table with every column."""
        lines.extend([f"## {title}", "", *table(rows, list(rows[0])), ""])

    if rows := results.get("streams"):
        columns = [c for c in rows[0] if c != "chunks/s, runs"]
        lines += ["## Streams: step 2's app, one at a time and 10-500 at once", ""]
        lines += [*table(rows, columns), ""]
        gthread, dev = (next(r for r in rows if r["server"] == n) for n in list(SERVERS)[1::-1])
        runs = "; ".join(
            f"{row['server']} " + ", ".join(f"{x:,.0f}" for x in row["chunks/s, runs"])
            for row in (dev, gthread)
        )
        ratio = gthread["chunks/s"] / dev["chunks/s"]
        lines += [
            f"Rate of one unpaced stream, each of three runs (chunks/s): {runs}. gthread / dev "
            f"server, best runs: {ratio:.2f} x (a figure of this machine, not a target).",
            "",
        ]
    if rows := results.get("capacity"):
        section(
            f"Capacity: N paced streams at once on one process ({settings['chunks']} chunks, "
            f"{settings['interval']:g} s apart)",
            rows,
        )
    if rows := results.get("fanout"):
        section(
            f"Fan-out: the chat step, one poster at {settings['rate']:g} messages/s for "
            f"{settings['seconds']:g} s",
            rows,
        )
    if rows := results.get("completions"):
        section(
            f"Completions: step 9 and its peer, {TOKENS} tokens each at {PACE:g} tokens/s, "
            "on one process",
            rows,
        )
    if rows := results.get("relay"):
        section(
            f"Relay: step 9 as a gateway, {TOKENS} tokens each at {PACE:g} tokens/s from an "
            "upstream that notes when it wrote each; then, in front of step 9, the clients "
            "leave one at a time",
            rows,
        )
    if rows := results.get("viewers"):
        section(
            "Viewers: step 10 and its peer, a sample a second, for "
            f"{settings['seconds']:g} s once all are open",
            rows,
        )
    if rows := results.get("dashboard"):
        section(
            f"Dashboard: step 10's viewers, a sample every {DASHBOARD_EVERY:g} s, for "
            f"{settings['seconds']:g} s once all are open; one in {STALLED} reads nothing",
            rows,
        )
    return lines


def ladder(text: str) -> list[int]:
    try:
        rungs = [int(part.replace("_", "")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a ladder is numbers with commas, got {text!r}") from None
    if not rungs or min(rungs) < 1:
        raise argparse.ArgumentTypeError("each rung must be at least 1")
    return rungs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the step servers on loopback.")
    parser.add_argument("--quick", action="store_true", help="small loads, for CI")
    parser.add_argument("--streams", action="store_true", help="run the streams part")
    parser.add_argument(
        "--capacity",
        nargs="?",
        const=[],
        type=ladder,
        metavar="N,N,...",
        help="run the capacity part (ladder: 1000,5000,10000)",
    )
    parser.add_argument(
        "--fanout",
        nargs="?",
        const=[],
        type=ladder,
        metavar="S,S,...",
        help="run the fan-out part (ladder: 500,1000,2500,5000)",
    )
    parser.add_argument(
        "--dashboard",
        nargs="?",
        const=[],
        type=ladder,
        metavar="V,V,...",
        help="run the dashboard part (ladder: 100,1000)",
    )
    parser.add_argument(
        "--completions",
        nargs="?",
        const=[],
        type=ladder,
        metavar="N,N,...",
        help="run step 9 against its sse-starlette peer (ladder: 1000,5000)",
    )
    parser.add_argument(
        "--relay",
        nargs="?",
        const=0,
        type=int,
        metavar="N",
        help="run step 9's relay, N streams (100)",
    )
    parser.add_argument(
        "--viewers",
        nargs="?",
        const=[],
        type=ladder,
        metavar="V,V,...",
        help="run step 10 against its sse-starlette peer (ladder: 1000,10000)",
    )
    parser.add_argument("--chunks", type=int, help="capacity: chunks per stream (30)")
    parser.add_argument("--interval", type=float, help="capacity: seconds between chunks (1)")
    parser.add_argument("--rate", type=float, help="fan-out: messages a second (10)")
    parser.add_argument(
        "--seconds", type=float, help="fan-out: seconds of posting; dashboard: of watching (10)"
    )
    parser.add_argument(
        "--window", type=int, default=1000, help="streams opening at once, at most (1000); 0: all"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=2048,
        help="the servers' listen backlog (2048, their default)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is not met")
    args = parser.parse_args(argv)

    run_capacity, run_fanout = args.capacity is not None, args.fanout is not None
    run_dashboard = args.dashboard is not None
    peers = {"completions": args.completions, "relay": args.relay, "viewers": args.viewers}
    run_peers = {part for part, value in peers.items() if value is not None}
    everything = not (args.streams or run_capacity or run_fanout or run_dashboard or run_peers)
    run_capacity, run_fanout = run_capacity or everything, run_fanout or everything
    run_dashboard = run_dashboard or everything
    run_peers = set(peers) if everything else run_peers
    quick = args.quick
    args.capacity = args.capacity or ([100, 300] if quick else [1000, 5000, 10_000])
    args.fanout = args.fanout or ([20, 60] if quick else [500, 1000, 2500, 5000])
    args.dashboard = args.dashboard or ([20, 100] if quick else [100, 1000])
    args.completions = args.completions or ([50] if quick else [1000, 5000])
    args.relay = args.relay or (5 if quick else 100)
    args.viewers = args.viewers or ([50] if quick else [1000, 10_000])
    args.chunks = args.chunks or (5 if quick else 30)
    args.interval = args.interval if args.interval is not None else (0.5 if quick else 1.0)
    args.rate = args.rate or 10.0
    args.seconds = args.seconds or (2.0 if quick else 10.0)
    args.window = args.window or None

    # The relay's streams go through two servers on this machine: two files each, here.
    wanted = [*args.capacity, *args.fanout, *args.dashboard, *args.completions, 2 * args.relay]
    fits, note = open_file_limit(max(wanted + [v + v // 9 for v in args.viewers]))
    print(note, file=sys.stderr)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load": [os.getloadavg()[0]],
        "settings": {
            key: value for key, value in vars(args).items() if key not in ("markdown", "json")
        }
        | {"open files": note},
    }
    if not HAS_UVICORN:
        print("(no Starlette reference: pip install -r bench/requirements.txt)", file=sys.stderr)
    if everything or args.streams:
        results["streams"] = [measure(name, command, quick) for name, command in SERVERS.items()]
    if run_capacity:
        servers = {n: c for n, c in CAPACITY_SERVERS.items() if HAS_UVICORN or n != REFERENCE}
        rows = [
            capacity(name, command, min(count, fits), args, args.window)
            for count in args.capacity
            for name, command in servers.items()
        ]
        if args.window and not quick:  # the top rung once more, every stream opening at once
            top = min(max(args.capacity), fits)
            rows += [capacity(name, command, top, args, None) for name, command in servers.items()]
        results["capacity"] = rows
    if run_fanout:
        setups = [name for name in FANOUT_SETUPS if HAS_UVICORN or "uvicorn" not in name]
        if not shutil.which("redis-server"):
            print("(no redis-server: only the in-process broker)", file=sys.stderr)
            setups = [name for name in setups if not FANOUT_SETUPS[name][2]]
        results["fanout"] = [
            fanout(name, min(count, fits), args) for count in args.fanout for name in setups
        ]
    if run_dashboard:
        results["dashboard"] = [
            dashboard(name, min(count, fits), args)
            for count in args.dashboard
            for name in DASHBOARD_SETUPS
        ]
    steps = {"completions": "stream_server_llm.py", "viewers": "stream_server_dashboard.py"}
    for part in sorted(run_peers):
        missing = steps.get(part, steps["completions"])
        if not (ROOT / missing).exists():
            print(f"({part}: no {missing} in this repository yet)", file=sys.stderr)
            continue
        if part == "relay":
            results["relay"] = [relay(min(args.relay, fits // 2), args)]
            continue
        servers = VIEWER_SERVERS if part == "viewers" else COMPLETION_SERVERS
        if not HAS_SSE_STARLETTE:
            print(
                f"({part}: no sse-starlette peer: pip install -r bench/requirements.txt"
                ", on Python 3.11 or later)",
                file=sys.stderr,
            )
            servers = {name: servers[name] for name in list(servers)[:1]}
        if part == "completions":
            results["completions"] = [
                completions(name, min(count, fits), args)
                for count in args.completions
                for name in servers
            ]
        else:  # each rung without stalled viewers, then with one in ten stalled
            results["viewers"] = [
                viewers(name, min(count, fits), stalled, args)
                for count in args.viewers
                for stalled in (0, max(1, count // 9))
                for name in servers
            ]
    results["load"].append(os.getloadavg()[0])
    results["targets"] = targets(results)
    lines = report(results)
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return exit_status(results, args.check)


def exit_status(results: dict, check_targets: bool) -> int:
    """1 if a stream failed at a small load (a bug, whatever the machine: slow is a number to
    read), or if `check_targets` and a target is not met; else 0."""
    small = results.get("streams", [])
    failed = sum(v for row in small for k, v in row.items() if k.endswith("errors"))
    if results["settings"]["quick"]:
        failed += sum(row["errors"] for row in results.get("capacity", []))
        for row in results.get("fanout", []):
            failed += row["errors"] + row["post errors"] + row["lost"] + row["duplicated"]
        failed += sum(row["reading, errors"] for row in results.get("dashboard", []))
        for part in ("completions", "viewers"):
            failed += sum(row["errors"] for row in results.get(part, []))
        failed += sum(row["errors"] for row in results.get("relay", []))
    missed = check_targets and not all(target["met"] for target in results["targets"])
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
