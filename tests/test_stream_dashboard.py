"""Step 10: stream_server_dashboard.py, stream_client_dashboard.py and the page, against real
servers on loopback. The sampler pauses at the test's gate between two samples, so that each
test takes the samples it needs, one at a time, and waits for nothing else."""

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack, closing

import psutil
import pytest
import requests
from selenium.webdriver.common.by import By
from werkzeug.serving import WSGIRequestHandler

import stream_client_dashboard as client
import stream_server_dashboard as server
from helpers import (
    ROOT,
    WAIT,
    free_port,
    only_help,
    run_step,
    save_screenshot,
    stop_step,
    wait_in_page,
    wait_until,
)
from stream_client_sse import Event, SSEParser

pytestmark = pytest.mark.step(server)
FIELDS = {"time", "cpu_percent", "memory_percent", "bytes_sent_per_s", "bytes_recv_per_s"}


@pytest.fixture
def sampler(gated, monkeypatch):
    """This process's Sampler, new for the test, paused at the gate before its first sample."""
    monkeypatch.setitem(server.app.config, "EVERY", 0.05)
    server.app.extensions.pop("dashboard", None)
    samples = server.sampler()
    gated.wait_for_pause()
    yield samples
    samples.running = False  # it stops after the sample it is on
    server.app.extensions.pop("dashboard", None)


def take(gate, count: int = 1) -> None:
    """Let the sampler take `count` samples; back when the last one is out to every viewer."""
    for _ in range(count):
        gate.let_one_through()
        gate.wait_for_pause()


@pytest.fixture
def base(serve, sampler):
    return serve(server.app)


class Viewer:
    """One GET /events, read event by event with step 4's parser."""

    def __init__(self, base: str, query: str = "", **headers: str) -> None:
        self.response = requests.get(
            f"{base}/events{query}", headers=headers, stream=True, timeout=WAIT
        )
        self.chunks = self.response.iter_content(chunk_size=None, decode_unicode=True)
        self.parser, self.events = SSEParser(), []

    def next(self):
        while not self.events:
            self.events += self.parser.feed(next(self.chunks))
        return self.events.pop(0)

    def ids(self, count: int) -> list[int]:
        return [int(self.next().id) for _ in range(count)]

    def close(self) -> None:
        self.response.close()


@pytest.fixture
def viewer(base):
    with ExitStack() as stack:
        yield lambda query="", **headers: stack.enter_context(
            closing(Viewer(base, query, **headers))
        )


# The present at once, and the history


def test_the_newest_sample_arrives_at_once(base, gated, viewer):
    take(gated, 3)
    watching = viewer()
    assert watching.response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert watching.response.headers["Transfer-Encoding"] == "chunked"
    first = watching.next()
    assert (first.type, first.id) == ("sample", "3")
    sample = json.loads(first.data)
    assert set(sample) == {*FIELDS, "viewers"} and sample["viewers"] == 0  # taken before it came
    assert all(type(sample[name]) in (int, float) for name in FIELDS)
    assert 0 <= sample["cpu_percent"] <= 100 and 0 < sample["memory_percent"] <= 100
    assert watching.parser.retry_ms == server.RETRY_MS  # `retry:` came first
    take(gated)
    fourth = json.loads(watching.next().data)
    assert fourth["viewers"] == 1 and fourth["time"] >= sample["time"]


@pytest.mark.parametrize(
    ("history", "ids"), [(0, [5]), (1, [5]), (3, [3, 4, 5]), (600, [1, 2, 3, 4, 5])]
)
def test_history_replays_the_last_samples_in_order(base, gated, viewer, history, ids):
    take(gated, 5)
    watching = viewer(f"?history={history}")
    assert watching.ids(len(ids)) == ids
    take(gated)
    assert watching.ids(1) == [6]


def test_a_viewer_before_the_first_sample_gets_it_when_it_comes(base, gated, viewer):
    watching = viewer("?history=60")
    take(gated)
    assert watching.ids(1) == [1]


@pytest.mark.parametrize(
    ("last_id", "ids"), [("2", [3, 4, 5, 6]), ("5", [6]), ("0", [1, 2, 3, 4, 5, 6])]
)
def test_last_event_id_resumes_after_it_then_goes_live(base, gated, viewer, last_id, ids):
    take(gated, 5)
    watching = viewer("?history=60", **{"Last-Event-ID": last_id})  # the id wins over history
    if ids[0] <= 5:  # held samples come at once
        assert watching.ids(ids.index(5) + 1) == ids[: ids.index(5) + 1]
    take(gated)
    assert watching.ids(1) == [6]


def test_an_id_from_before_a_restart_gets_the_present(base, gated, viewer):
    take(gated, 2)
    assert viewer(**{"Last-Event-ID": "9000"}).ids(1) == [2]


def test_resume_reaches_back_600_samples_at_most(base, gated, viewer):
    take(gated, 610)
    assert viewer(**{"Last-Event-ID": "1"}).ids(600) == list(range(11, 611))


def test_quiet_streams_carry_keep_alive_comments(base, monkeypatch):
    monkeypatch.setattr(server, "HEARTBEAT", 0.01)
    watching = Viewer(base)
    with closing(watching):
        text = ""
        while ": keep-alive\n\n" not in text:
            text += next(watching.chunks)


# One sampler, however many viewers


def test_200_viewers_share_one_sampler(base, gated, viewer):
    take(gated)
    viewers = [viewer() for _ in range(200)]
    assert [v.ids(1) for v in viewers] == [[1]] * 200
    for number in (2, 3, 4):
        take(gated)
        status = requests.get(f"{base}/status", timeout=WAIT).json()
        assert status == {
            "viewers": 200,
            "samples_taken": number,
            "every": 0.05,
            "pid": os.getpid(),
        }
        events = [v.next() for v in viewers]
        assert {(e.id, json.loads(e.data)["viewers"]) for e in events} == {(str(number), 200)}


def test_status_counts_viewers_in_and_out(base, gated, viewer):
    watching = Viewer(base)
    take(gated)
    watching.next()
    assert requests.get(f"{base}/status", timeout=WAIT).json()["viewers"] == 1
    watching.close()

    def counted_out() -> bool:  # the server finds out the viewer left when it writes to it
        take(gated)
        return requests.get(f"{base}/status", timeout=WAIT).json()["viewers"] == 0

    wait_until(counted_out)


# Stalled viewers cost nothing


def stalled(base: str, receive_buffer: int | None = None) -> socket.socket:
    """A viewer that sends its request, then reads nothing."""
    sock = socket.socket()
    if receive_buffer:  # before connecting: it sets the window the server may fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def test_100_stalled_viewers_neither_delay_another_nor_grow_memory(base, gated, viewer):
    take(gated)
    with ExitStack() as stack:
        for _ in range(100):
            stack.enter_context(stalled(base))
        reader = viewer()
        assert reader.ids(1) == [1]
        wait_until(lambda: requests.get(f"{base}/status", timeout=WAIT).json()["viewers"] == 101)
        for number in range(2, 52):  # a warm-up, for the threads' stacks and Python's free lists
            take(gated)
            assert reader.ids(1) == [number]
        before = psutil.Process().memory_info().rss
        # 1,000 samples (50 s of stalling at --every 0.05): the reader gets each one before the
        # next is taken, so its gaps are the sampler's; the stalled ones hold the server up nowhere.
        for number in range(52, 1052):
            take(gated)
            assert reader.ids(1) == [number]
        growth = psutil.Process().memory_info().rss - before
    # Queued for 100 viewers, 1,000 samples of ~190 bytes would be 19 MB.
    assert growth < 4_000_000, growth


def sample_ids(answer: bytes) -> list[int]:
    """The ids of the samples in a raw answer so far (its chunk framing left in: ids count)."""
    body = answer.partition(b"\r\n\r\n")[2].decode(errors="replace")
    return [int(event.id) for event in SSEParser().feed(body) if event.type == "sample"]


class SmallSendBuffer(WSGIRequestHandler):
    """Werkzeug's handler, with a send buffer of a few kilobytes: Linux would otherwise let
    it grow to 4 MB (tcp_wmem), 20,000 samples for this test to take before it is full."""

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def test_a_viewer_that_filled_its_buffers_skips_to_recent_samples(serve, sampler, gated):
    base = serve(server.app, request_handler=SmallSendBuffer)
    take(gated)
    with closing(stalled(base, receive_buffer=4096)) as sock:
        take(gated, 1000)  # 190 KB of events: many times what both sockets' buffers hold
        sock.settimeout(WAIT)
        answer = b""
        while 1001 not in sample_ids(answer):
            answer += sock.recv(65536)
        take(gated)
        while 1002 not in sample_ids(answer):
            answer += sock.recv(65536)
    ids = sample_ids(answer)
    # What the buffers held, in order, then the newest, then live: never the backlog.
    assert ids[-2:] == [1001, 1002]
    assert ids == sorted(ids) and len(ids) < 500, ids


# Bad input


@pytest.mark.parametrize(
    "query", ["history=-1", "history=601", "history=x", "history=%D9%A1", "history=1.5"]
)
def test_a_bad_history_gets_400(base, query):
    response = requests.get(f"{base}/events?{query}", timeout=WAIT)
    assert response.status_code == 400
    assert response.json()["error"].startswith("history must be a whole number from 0 to 600")


@pytest.mark.parametrize("last_id", ["x", "-1", "1.5", "+3", "1234567890123456789", "%D9%A1"])
def test_a_bad_last_event_id_gets_400(base, last_id):
    response = requests.get(f"{base}/events", headers={"Last-Event-ID": last_id}, timeout=WAIT)
    assert response.status_code == 400
    assert response.json() == {"error": "Last-Event-ID must be the id of an event this server sent"}


@pytest.mark.parametrize("every", ["0", "0.01", "61", "nan", "x"])
def test_a_bad_every_is_a_usage_error(every):
    command = [sys.executable, "stream_server_dashboard.py", "--every", every]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2 and result.stderr.startswith("usage:")
    assert "--every" in result.stderr.splitlines()[-1]


# The client


def stop_after(count: int, monkeypatch) -> None:
    """Make the client's follow() end like Ctrl-C after `count` events."""
    real = client.follow

    def follow(url: str, params: dict):
        for number, event in enumerate(real(url, params), 1):
            yield event
            if number == count:
                raise KeyboardInterrupt

    monkeypatch.setattr(client, "follow", follow)


def test_client_once_prints_one_line_per_sample(base, gated, capsys, monkeypatch):
    take(gated, 3)
    stop_after(2, monkeypatch)
    assert client.main(["--url", base, "--once", "--history", "2"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["#2", "#3"]
    pattern = r"#3 \d\d:\d\d:\d\d  cpu +[0-9.]+%  mem +[0-9.]+%  "
    pattern += r"net up [0-9.,]+ kB/s down [0-9.,]+ kB/s  viewers 0"
    assert re.fullmatch(pattern, lines[1]), lines[1]


def test_client_draws_a_table_of_the_samples(base, gated, capsys, monkeypatch):
    take(gated, 3)
    stop_after(3, monkeypatch)
    assert client.main(["--url", base]) == 130
    out = capsys.readouterr().out
    assert "#3 " in out
    for name in ("cpu_percent", "memory_percent", "bytes_sent_per_s", "bytes_recv_per_s"):
        assert re.search(rf"{name} +│ [0-9.,]+ +│ [▁-█]{{3}} ", out), name


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        '{"cpu_percent": "\\u001b[2J"}',
        json.dumps(dict.fromkeys([*FIELDS, "viewers"], "\x1b[31mred")),
        json.dumps(dict.fromkeys([*FIELDS, "viewers"], True)),
        "[]",
    ],
)
def test_client_shows_only_samples_of_numbers(data):
    assert client.sample_of(Event("sample", data, "1")) is None


def test_client_shows_only_numbered_samples():
    data = json.dumps(dict.fromkeys([*FIELDS, "viewers"], 1))
    assert client.sample_of(Event("sample", data, "1")) is not None
    assert client.sample_of(Event("sample", data, "\x1b[2J")) is None


def test_client_reports_bad_input_and_a_missing_server(base, capsys):
    assert client.main(["--url", base, "--history", "601"]) == 1
    error = "error: server answered 400: history must be a whole number from 0 to 600, got '601'"
    assert capsys.readouterr().err.strip() == error
    url = f"http://127.0.0.1:{free_port()}"
    assert client.main(["--url", url, "--once"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: cannot connect to {url}/events: is the server running? "
        "Start it with: python stream_server_dashboard.py"
    )


# Restarts: the real scripts, as a reader runs them


class Lines:
    """A process's output, line by line, as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [self.queue.put(line) for line in process.stdout], daemon=True
        ).start()

    def until(self, pattern: str) -> str:
        while True:
            line = self.queue.get(timeout=WAIT)
            if re.search(pattern, line):
                return line


def test_client_reconnects_after_a_server_restart(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    every = ("--every", "0.1")
    server_process = run_step("stream_server_dashboard.py", log, port, *every)
    command = [sys.executable, "-u", "stream_client_dashboard.py", "--once"]
    command += ["--url", f"http://127.0.0.1:{port}"]
    shown = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(shown)
        lines.until(r"^#\d+ ")
        stop_step(server_process)
        lines.until(r"^\(the connection was lost; resuming after event \d+ in 2s\)")
        server_process = run_step("stream_server_dashboard.py", log, port, *every)
        lines.until(r"^#\d+ ")  # from the new server: its first samples, then live ones
    finally:
        shown.terminate()
        shown.wait(WAIT)
        shown.stdout.close()
        stop_step(server_process)


def test_client_once_stops_quietly_when_its_pipe_closes(tmp_path):
    port = free_port()
    every = ("--every", "0.05")
    server_process = run_step("stream_server_dashboard.py", tmp_path / "log", port, *every)
    command = [sys.executable, "stream_client_dashboard.py", "--once"]
    command += ["--url", f"http://127.0.0.1:{port}"]
    try:  # what `| head -2` does: read two lines, then close the pipe
        shown = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert [shown.stdout.readline()[:1] for _ in range(2)] == [b"#", b"#"]
        shown.stdout.close()
        assert shown.wait(WAIT) == 0
        assert shown.stderr.read() == b""  # no traceback
        shown.stderr.close()
    finally:
        stop_step(server_process)


# The page, in headless Chromium


def text_of(page, element_id: str) -> str:
    return page.find_element(By.ID, element_id).text


def points(page) -> int:
    return int(page.find_element(By.ID, "chart").get_attribute("data-points"))


def test_the_page_is_served(base):
    response = requests.get(base, timeout=WAIT)
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert 'new EventSource("/events?history=60")' in response.text
    # Nothing loaded from elsewhere, and nothing from the network written as HTML.
    assert "<script src" not in response.text and ".innerHTML =" not in response.text


def test_the_chart_grows_and_the_numbers_match_the_events(base, gated, browser):
    take(gated, 2)
    browser.get(base)
    watching = Viewer(base, "?history=600")
    with closing(watching):
        samples = {event.id: json.loads(event.data) for event in (watching.next(), watching.next())}
        wait_in_page(browser, lambda: points(browser) == 2, "the history's 2 points")
        for number in range(3, 33):
            take(gated)
            event = watching.next()
            samples[event.id] = json.loads(event.data)
            wait_in_page(browser, lambda n=number: points(browser) == n, f"{number} points")
            assert text_of(browser, "status").startswith(f"live: sample #{number}")
            sample = samples[str(number)]
            assert text_of(browser, "cpu_percent") == f"{sample['cpu_percent']:.1f} %"
            assert text_of(browser, "memory_percent") == f"{sample['memory_percent']:.1f} %"
            sent = sample["bytes_sent_per_s"]
            assert text_of(browser, "bytes_sent_per_s") in (
                f"{sent / 1e3:.1f} kB/s",
                f"{sent / 1e6:.1f} MB/s",
            )
            assert text_of(browser, "viewers") == str(sample["viewers"]) == "2"


def test_the_page_resumes_after_a_server_restart(browser, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    every = ("--every", "0.1")
    process = run_step("stream_server_dashboard.py", log, port, *every)
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait_in_page(browser, lambda: points(browser) >= 3, "3 points")
        stop_step(process)
        wait_in_page(
            browser, lambda: text_of(browser, "status").startswith("connection lost"), "the loss"
        )
        process = run_step("stream_server_dashboard.py", log, port, *every)
        wait_in_page(
            browser, lambda: "after a lost connection" in text_of(browser, "status"), "the resume"
        )
    finally:
        stop_step(process)


def test_screenshot_of_the_page(browser, tmp_path):
    """For people to look at (test-artifacts/dashboard_page.png): the real sampler, real time."""
    port = free_port()
    process = run_step(
        "stream_server_dashboard.py", tmp_path / "server.log", port, "--every", "0.1"
    )
    try:
        browser.get(f"http://127.0.0.1:{port}")
        wait_in_page(browser, lambda: points(browser) >= 5, "5 points")
        stop_step(process)  # and back: the status line says so
        process = run_step(
            "stream_server_dashboard.py", tmp_path / "server.log", port, "--every", "0.1"
        )
        wait_in_page(
            browser, lambda: "after a lost connection" in text_of(browser, "status"), "the resume"
        )
        wait_in_page(browser, lambda: points(browser) >= 60, "60 points")
        assert save_screenshot(browser, "dashboard_page.png")
    finally:
        stop_step(process)


def test_help_prints_only_the_help():
    assert only_help("stream_server_dashboard.py")
    assert only_help("stream_client_dashboard.py")


# Under gunicorn, where there are no flags


def test_under_gunicorn_the_period_comes_from_the_environment(gunicorn):
    served = gunicorn("stream_server_dashboard", "gevent", env={"DASHBOARD_EVERY": "0.05"})
    with closing(Viewer(served.url)) as watching:
        assert watching.ids(2)[1] > 1
    status = requests.get(f"{served.url}/status", timeout=WAIT).json()
    assert status["every"] == 0.05 and status["samples_taken"] >= 2


@pytest.mark.parametrize("every", ["0", "61", "nan", "one"])
def test_under_gunicorn_a_bad_period_stops_gunicorn_at_start_with_its_reason(every):
    # Before, gunicorn started, and every request got a 500 and logged a traceback.
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
    command += ["stream_server_dashboard:app"]
    env = {**os.environ, "DASHBOARD_EVERY": every}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=WAIT)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"DASHBOARD_EVERY must be from 0.05 to 60 s, not {every!r}" in output
    assert "Booting worker" not in output and "Traceback" not in output
