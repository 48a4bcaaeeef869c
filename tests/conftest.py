"""Fixtures shared by every step's tests: a real server on a free port, stand-ins for a
server's sleep() (a gate, a recorder, a dropped connection), a throwaway CA, and the real
programs the tests start: redis-server, nginx, gunicorn and headless Chromium."""

import itertools
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import trustme
from flask import Flask
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from werkzeug.serving import make_server

from helpers import WAIT, Answer, ScriptedServer
from services import CHROMEDRIVER, CHROMIUM, Gunicorn, Nginx, RedisServer, RQWorker, require


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Run apps in Werkzeug's threaded server on 127.0.0.1, a free port each; give base URLs.
    With an ssl_context, the server speaks HTTPS only; request_handler replaces Werkzeug's."""
    servers = []

    def start(
        app: Flask, ssl_context: ssl.SSLContext | None = None, request_handler: type | None = None
    ) -> str:
        # threaded=True, as in the scripts: without it the server speaks HTTP/1.0, not chunked.
        server = make_server(
            "127.0.0.1",
            0,
            app,
            threaded=True,
            ssl_context=ssl_context,
            request_handler=request_handler,
        )
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        scheme = "https" if ssl_context else "http"
        return f"{scheme}://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[str, list[Answer]]], ScriptedServer]]:
    """Start servers on bare sockets that send scripted bytes (see helpers.ScriptedServer):
    scripted({path: [Answer, ...]}) gives a running one; all stop when the test ends."""
    servers: list[ScriptedServer] = []

    def start(answers: dict[str, list[Answer]]) -> ScriptedServer:
        servers.append(ScriptedServer(answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


class Gate:
    """Stands in for a server module's `sleep`: a stream pauses here between two chunks
    until the test lets it on, one pause at a time or all at once, so tests never
    depend on timing."""

    def __init__(self) -> None:
        self.paused = threading.Semaphore(0)  # released once each time a stream pauses
        self._condition = threading.Condition()
        self._permits = 0
        self._open = False

    def sleep(self, seconds: float) -> None:
        self.paused.release()
        with self._condition:
            if not self._condition.wait_for(lambda: self._open or self._permits, WAIT):
                raise TimeoutError("the test never let the stream on")
            if not self._open:
                self._permits -= 1

    def wait_for_pause(self) -> None:
        assert self.paused.acquire(timeout=WAIT), "no stream paused"

    def let_one_through(self) -> None:
        with self._condition:
            self._permits += 1
            self._condition.notify()

    def open(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.open()  # let any stream still paused run to its end


def step_under_test(request) -> ModuleType:
    """The step module whose sleep() the fixtures below replace: each test module names it
    with `pytestmark = pytest.mark.step(<module>)`."""
    marker = request.node.get_closest_marker("step")
    if marker is None:
        pytest.fail("mark the test module with pytestmark = pytest.mark.step(<step module>)")
    return marker.args[0]


@pytest.fixture
def gated(request, monkeypatch, gate) -> Gate:
    """The marked step pauses at the gate between chunks."""
    monkeypatch.setattr(step_under_test(request), "sleep", gate.sleep)
    return gate


@pytest.fixture
def pauses(request, monkeypatch) -> list[float]:
    """A controllable clock: the marked step records its pauses instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(step_under_test(request), "sleep", recorded.append)
    return recorded


@pytest.fixture
def drop_connection(request, monkeypatch) -> Callable[..., None]:
    """Make the marked step break its connection at one pause (1 is the first), as a
    network failure would. The other pauses sleep for real only if asked to."""
    step = step_under_test(request)

    def patch(at_pause: int, real_sleep: bool = False) -> None:
        slept, pauses = step.sleep, itertools.count(1)

        def sleep(seconds: float) -> None:
            if next(pauses) == at_pause:
                raise ConnectionResetError("dropped by the test")
            if real_sleep:
                slept(seconds)

        monkeypatch.setattr(step, "sleep", sleep)

    return patch


@pytest.fixture(scope="session")
def tls(tmp_path_factory) -> SimpleNamespace:
    """A throwaway CA and a certificate it signed for 127.0.0.1 and localhost, as files (what
    `python -m trustme` makes) and as the server's SSL context."""
    folder: Path = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(folder / "client.pem")
    certificate.private_key_pem.write_to_path(folder / "server.key")
    certificate.cert_chain_pems[0].write_to_path(folder / "server.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)
    return SimpleNamespace(
        ca_file=str(folder / "client.pem"),
        cert_file=str(folder / "server.pem"),
        key_file=str(folder / "server.key"),
        server_context=context,
    )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole run (Debian's package, installed by .ci/run)."""
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, empty Redis, for one test."""
    redis_server.start()  # if a test before this one stopped it; else it runs already
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def nginx() -> Iterator[Callable[..., Nginx]]:
    """Start deploy/nginx.conf (Debian's nginx, installed by .ci/run) in front of apps:
    nginx(port) or nginx(port, second_port), with directives to change as keywords (and run_as,
    a user to run it as when the tests run as root). Each call gives a running Nginx, whose
    `url` is where to send requests; all stop when the test ends."""
    started: list[Nginx] = []

    def start(*app_ports: int, run_as: str | None = None, **settings: str) -> Nginx:
        started.append(Nginx(app_ports, settings, run_as))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


@pytest.fixture
def gunicorn() -> Iterator[Callable[..., Gunicorn]]:
    """Start a step's app under gunicorn: gunicorn(module, worker), with Gunicorn's other
    options as keywords (threads=8, extra, workers=1, env). Each call gives a running server
    (on a free port); all stop when the test ends."""
    started: list[Gunicorn] = []

    def start(module: str, worker: str = "gthread", **options) -> Gunicorn:
        started.append(Gunicorn(module, worker, **options))
        return started[-1]

    yield start
    for server in started:
        server.stop()  # does nothing to a server the test has stopped already


@pytest.fixture
def rq_worker() -> Iterator[Callable[..., RQWorker]]:
    """Start RQ's worker on a Redis: rq_worker(redis_url, env={...}). Each call gives a worker
    that listens on the `jobs` queue; all stop when the test ends."""
    started: list[RQWorker] = []

    def start(redis_url: str, env: dict[str, str] | None = None) -> RQWorker:
        started.append(RQWorker(redis_url, env))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()  # does nothing to a worker the test has killed already


# Debian's chromium, started the way that works on a machine with no network and no screen.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium, driven by selenium (.ci/run installs it when missing)."""
    require(bool(CHROMIUM), "chromium", "chromium")
    require(bool(CHROMEDRIVER), "chromedriver", "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        yield driver
        driver.quit()
