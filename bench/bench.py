"""Measure the step servers under Werkzeug's dev server and under gunicorn (gthread, gevent).

For each server it measures, on 127.0.0.1 only:
  - first chunk: from sending the request to the first chunk's arrival (median), and how far
    the gaps of a paced stream stray from the interval asked for;
  - rate: chunks per second of one `count=N&interval=0` stream, read as fast as possible;
  - concurrency: wall time for 10, 100 and 500 one-second streams started at once (the median
    of three runs), with the errors of all three;
  - memory: the server's peak RSS growth (all its processes) while the rate stream runs;
  - fairness: the longest time to the first chunk of a short stream while 4 streams at
    interval=0 run, each read as fast as it comes.
Every load is bounded in count and time, and every server is stopped by the PID it started.

    python bench/bench.py                       # the full run, a few minutes
    python bench/bench.py --quick               # small loads, seconds (CI runs this)
    python bench/bench.py --rate                # only the rate, memory and fairness
    python bench/bench.py --markdown bench/results.md
"""

import argparse
import contextlib
import importlib.util
import itertools
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

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
BARE_WSGI = [*SERVERS["gunicorn gevent"][:-1], "--pythonpath", "bench", "wsgi_app:app"]
SERVERS["gunicorn gevent, bare WSGI (reference)"] = BARE_WSGI
UVICORN = [sys.executable, "-m", "uvicorn", "--app-dir", "bench", "starlette_app:app"]
UVICORN += ["--port", "{port}", "--no-access-log", "--log-level", "warning"]
if all(importlib.util.find_spec(name) for name in ("starlette", "uvicorn")):
    SERVERS["uvicorn + Starlette (reference)"] = UVICORN
STREAM_TIMEOUT = 60.0  # seconds any one measured stream may take before it counts as an error
FAST = 4  # streams at interval=0 that run while first_chunk_beside_fast_streams measures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free loopback port, stopped by the PID this script started."""

    def __init__(self, command: list[str], module: str) -> None:
        self.port = free_port()
        argv = [part.format(module=module, port=self.port) for part in command]
        self.process = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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

    def rss(self) -> int:
        """Resident memory of the server and its workers, in bytes."""
        parent = psutil.Process(self.process.pid)
        processes = [parent, *parent.children(recursive=True)]
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):  # a worker may just have exited
                total += process.memory_info().rss
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


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


def rate_and_memory(server: Server, count: int, runs: int) -> tuple[float, float]:
    """Chunks per second of an unpaced stream (the best of `runs`, the one least disturbed by
    anything else on the machine), and the server's peak RSS growth meanwhile, in MB."""
    baseline, peak, done = server.rss(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], server.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    path = f"/stream/rate?count={count}&interval=0"
    try:
        seconds = min(fast_read(server.port, path) for _ in range(runs))
    finally:
        done.set()
        sampler.join()
    return count / seconds, max(0, peak[0] - baseline) / 1e6


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
    """Wall seconds for `users` one-second streams started at once, and how many failed.

    Plain non-blocking sockets and `selectors` on one thread: the client shares the machine's
    cores with the server, and an asyncio client's own work added about 0.07 s to 500 streams."""
    selector, started = selectors.DefaultSelector(), time.perf_counter()
    for user in range(users):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((HOST, port))  # completes in the background; writable once connected
        path = f"/stream/user{user}?count=2&interval=1"  # two chunks, one second apart
        selector.register(sock, selectors.EVENT_WRITE, (user, get_request(path), bytearray()))
    failed, deadline = 0, started + STREAM_TIMEOUT
    while selector.get_map() and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=deadline - time.perf_counter()):
            sock, (user, request, received) = key.fileobj, key.data
            try:
                if key.events == selectors.EVENT_WRITE:  # connected, or refused
                    if error := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError(error, "connect failed")
                    sock.sendall(request)  # a few bytes into an empty send buffer
                    selector.modify(sock, selectors.EVENT_READ, key.data)
                    continue
                block = sock.recv(1 << 16)
                received += block
                if block and not received.endswith(b"\r\n0\r\n\r\n"):
                    continue  # more to come
            except OSError:  # refused or reset
                received.clear()
            last_chunk = f"chunk 2 of 2 for user{user}\n".encode()
            failed += not (received.startswith(b"HTTP/1.1 200 ") and last_chunk in received)
            selector.unregister(sock)
            sock.close()
    for key in list(selector.get_map().values()):  # still open at the deadline: failed
        failed += 1
        selector.unregister(key.fileobj)
        key.fileobj.close()
    selector.close()
    return time.perf_counter() - started, failed


def measure(name: str, command: list[str], quick: bool, rate_only: bool) -> dict:
    print(f"measuring {name} ...", file=sys.stderr, flush=True)
    server = Server(command, "stream_server_multiuser")
    try:
        for worker in range(4):  # warm up: the first request of each worker imports and caches
            stream(server.port, f"/stream/warmup{worker}?count=1")
        row = {"server": name}
        if not rate_only:
            first, gap = first_chunk_and_gaps(server.port, runs=3 if quick else 10)
            row |= {"first chunk ms": first, "gap error ms": gap}
        rate, memory = rate_and_memory(server, count=20_000 if quick else 100_000, runs=3)
        row |= {"chunks/s": rate, "memory growth MB": memory}
        row[f"first chunk beside {FAST} fast ms"] = first_chunk_beside_fast_streams(
            server.port, FAST, probes=3 if quick else 10
        )
        if rate_only:
            return row
        for users in (10, 50) if quick else (10, 100, 500):
            runs = [concurrent_streams(server.port, users) for _ in range(1 if quick else 3)]
            row[f"{users} streams s"] = statistics.median(seconds for seconds, _ in runs)
            row[f"{users} errors"] = sum(errors for _, errors in runs)
        return row
    finally:
        server.stop()


def table(rows: list[dict]) -> list[str]:
    columns = list(rows[0])
    cells = [
        [f"{row[c]:,.0f}" if c == "chunks/s" else format_cell(row[c]) for c in columns]
        for row in rows
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(line) + " |" for line in cells]


def format_cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def targets(rows: list[dict]) -> list[str]:
    by_name = {row["server"]: row for row in rows}
    dev, gthread, gevent = (by_name[name] for name in list(SERVERS)[:3])
    speedup = gthread["chunks/s"] / dev["chunks/s"]
    beside = f"first chunk beside {FAST} fast ms"
    checks = [
        (f"gunicorn gthread rate >= 1.3 x dev server's ({speedup:.2f} x)", speedup >= 1.3),
        (
            "memory growth under 10 MB on every server",
            all(r["memory growth MB"] < 10 for r in rows),
        ),
        (
            f"first chunk within 500 ms beside {FAST} streams at interval=0, on every server "
            f"(gevent: {gevent[beside]:.0f} ms)",
            all(r[beside] <= 500 for r in rows),
        ),
    ]
    if "first chunk ms" not in gevent:  # --rate
        return [f"- [{'x' if met else ' '}] {text}" for text, met in checks]
    concurrency = max(k for k in gevent if k.endswith("streams s"))
    checks += [
        (
            f"gevent: {concurrency.split()[0]} one-second streams within 1.2 s "
            f"({gevent[concurrency]:.2f} s)",
            gevent[concurrency] <= 1.2,
        ),
        ("first chunk within 5 ms on every server", all(r["first chunk ms"] <= 5 for r in rows)),
    ]
    return [f"- [{'x' if met else ' '}] {text}" for text, met in checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the step servers on loopback.")
    parser.add_argument("--quick", action="store_true", help="small loads, for CI")
    parser.add_argument(
        "--rate", action="store_true", help="only the single-stream rate, memory and fairness"
    )
    parser.add_argument("--markdown", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    if len(SERVERS) == 4:
        print("(no Starlette reference: pip install -r bench/requirements.txt)", file=sys.stderr)
    rows = [measure(name, command, args.quick, args.rate) for name, command in SERVERS.items()]
    machine = (
        f"{platform.system()} {platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )
    report = [
        f"Step 2 app on {machine}{' (quick run)' if args.quick else ''}:",
        "",
        *table(rows),
        "",
        *targets(rows),
    ]
    print("\n".join(report))
    if args.markdown:
        args.markdown.write_text("\n".join(report) + "\n")
    failed = sum(value for row in rows for key, value in row.items() if key.endswith("errors"))
    return 1 if failed else 0  # slow is a number to read; a failed stream is a bug


if __name__ == "__main__":
    sys.exit(main())
