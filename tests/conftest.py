"""Fixtures shared by every step's tests: a real server on a free port, and a gate
that holds a stream between two chunks until the test lets it go on."""

import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trustme
from flask import Flask
from werkzeug.serving import make_server

from helpers import WAIT


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Run apps in Werkzeug's threaded server on 127.0.0.1, a free port each; give base URLs.
    With an ssl_context, the server speaks HTTPS only."""
    servers = []

    def start(app: Flask, ssl_context: ssl.SSLContext | None = None) -> str:
        # threaded=True, as in the scripts: without it the server speaks HTTP/1.0, not chunked.
        server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ssl_context)
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


class Gate:
    """Stands in for a server module's `sleep`: a stream pauses here between two
    chunks until the test opens the gate, so tests never depend on timing."""

    def __init__(self) -> None:
        self.paused = threading.Semaphore(0)  # released once each time a stream pauses
        self._open = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.paused.release()
        if not self._open.wait(WAIT):
            raise TimeoutError("the test never opened the gate")

    def wait_for_pause(self) -> None:
        assert self.paused.acquire(timeout=WAIT), "no stream paused"

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.open()  # let any stream still paused run to its end


@pytest.fixture
def gated(request, monkeypatch, gate) -> Gate:
    """The test module's `server` pauses at the gate between chunks."""
    monkeypatch.setattr(request.module.server, "sleep", gate.sleep)
    return gate


@pytest.fixture
def pauses(request, monkeypatch) -> list[float]:
    """A controllable clock: the test module's `server` records its pauses instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(request.module.server, "sleep", recorded.append)
    return recorded


class Turnstile:
    """Stands in for a server module's `sleep`: each pause lets one stream on only when
    the test calls `let_one_through`, so a test can watch events arrive one by one."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)
        self._closed = threading.Event()

    def sleep(self, seconds: float) -> None:
        if not self._permits.acquire(timeout=WAIT) and not self._closed.is_set():
            raise TimeoutError("the test never let the stream through")

    def let_one_through(self) -> None:
        self._permits.release()

    def open(self) -> None:
        self._closed.set()
        for _ in range(1000):  # enough for every pause a test's streams have left
            self._permits.release()


@pytest.fixture
def turnstile() -> Iterator[Turnstile]:
    turnstile = Turnstile()
    yield turnstile
    turnstile.open()


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
