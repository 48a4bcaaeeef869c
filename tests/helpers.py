"""Small helpers for the tests: raw sockets, expected framing, bounded waiting, pages in the
browser."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import websocket
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: the most any test waits for something that should happen at once
# The signing key of the token steps' tests: 64 bytes or more, so that PyJWT accepts
# it for HS512 forgeries too.
TEST_KEY = b"the test signing key " * 4


def token_for(sub="Alice", key=TEST_KEY, algorithm="HS256", typ="at+jwt", **changes) -> str:
    """Forge an access token with PyJWT: valid unless the arguments say otherwise (None drops
    a claim, typ=None the header's typ)."""
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + 3600, **changes}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"typ": typ} if typ else None)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    """A port nobody listens on: bound by the OS for a moment, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_get(base_url: str, path: str) -> bytes:
    """Send a GET over a bare socket and return every byte of the answer, framing included."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        while data := sock.recv(65536):
            answer += data
    return answer


def chunked(*payloads: bytes) -> bytes:
    """The exact chunked body that carries `payloads`: hex size, CRLF, data, CRLF; then 0."""
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)
    return framed + b"0\r\n\r\n"


def wait_until(condition: Callable[[], bool]) -> None:
    """Check `condition` until it holds, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_in_page(page, condition: Callable[[], bool], what: str):
    """Check `condition` in the browser's page until it holds, for at most WAIT seconds."""
    return WebDriverWait(page, WAIT, poll_frequency=0.02).until(
        lambda _: condition(), message=f"the page never showed {what}"
    )


def save_screenshot(page, name: str) -> bool:
    """Save what the page shows as test-artifacts/<name>, for people to look at; with
    UPDATE_SCREENSHOTS=1, as docs/<name> too, the picture that the step's page shows."""
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    saved = page.save_screenshot(str(artifacts / name))
    if saved and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(artifacts / name, ROOT / "docs" / name)
    return saved


def port_of(url: str) -> int:
    """The port of a base URL such as http://127.0.0.1:5000."""
    return int(url.rsplit(":", 1)[1])


def only_help(script: str) -> bool:
    """Whether `python script --help`, with no JWT_SECRET_KEY set, prints its usage and
    nothing else: a step does nothing a reader sees at import, before they asked."""
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET_KEY", "REDIS_URL")}
    command = [sys.executable, script, "--help"]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=WAIT
    )
    return result.returncode == 0 and result.stdout.startswith("usage:") and not result.stderr


@contextlib.contextmanager
def https_step(script: str, tls) -> Iterator[str]:
    """Run a step's server as a reader would, with --cert and --key on a port the OS picks
    (the dev server logs the one it got, once it listens); give its https:// base URL."""
    command = [sys.executable, script, "--port", "0"]
    command += ["--cert", tls.cert_file, "--key", tls.key_file]
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if match := re.search(r"Running on (https://127\.0\.0\.1:\d+)", line):
                yield match.group(1)
                break
        else:
            raise AssertionError("the server exited without saying where it serves HTTPS")
    finally:
        process.terminate()
        process.wait(WAIT)
        process.stderr.close()


def run_step(script: str, log: Path, port: int, *flags: str) -> subprocess.Popen:
    """Run a step's script on `port` (and its other `flags`), with the test key, its log in a
    file; back once it listens. stop_step() ends it."""
    command = [sys.executable, script, "--port", str(port), *flags]
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()}
    with log.open("a") as output:  # the child keeps its own copy of the file
        process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=output)
    wait_until(lambda: f"Running on http://127.0.0.1:{port}" in log.read_text())
    return process


def stop_step(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(WAIT)


# Step 5's WebSocket: the handshake's headers, a connection, and its messages, JSON objects
# each with a "type".

HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def open_ws(base_url: str, query: str = "count=1000&interval=0.05", token: str | None = None):
    """A WebSocket to the step's /ws at an http:// base URL, with a valid token unless given
    one."""
    url = f"{base_url.replace('http', 'ws')}/ws?{query}"
    return websocket.create_connection(
        url, header=[f"Authorization: Bearer {token or token_for()}"], timeout=WAIT
    )


def receive(ws) -> dict:
    return json.loads(ws.recv())


def send(ws, **command) -> None:
    ws.send(json.dumps(command))


def next_of_type(ws, kind: str) -> dict:
    """Read on until a message of this type; chunks in flight may come before it."""
    while (message := receive(ws))["type"] != kind:
        assert message["type"] == "chunk", message
    return message


# A server on a bare socket, for answers that no framework would send: a stream cut in the
# middle of an event or a line, a byte order mark, a charset that lies.


@dataclass
class Answer:
    """One scripted answer: its body written piece by piece as given, chunked unless told not
    to be; complete=False drops the connection before the body's end (no final chunk). With
    `hold`, the server waits for it to be set before that end: a browser's fetch() loses what
    it has not read yet when the connection drops."""

    pieces: list[bytes]
    content_type: str = "text/event-stream"
    chunked: bool = True
    complete: bool = True
    status: str = "200 OK"
    hold: threading.Event | None = None

    def head(self) -> bytes:
        length = "Transfer-Encoding: chunked" if self.chunked else (
            f"Content-Length: {sum(map(len, self.pieces))}"
        )
        return (
            f"HTTP/1.1 {self.status}\r\nContent-Type: {self.content_type}\r\n{length}\r\n"
            "Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
        ).encode()


class ScriptedServer:
    """Answers each request to a path with the next of the answers scripted for that path (the
    last one again once they run out), each on a connection of its own, and keeps every
    request's target and headers (as bytes, names in lower case) in `requests[path]`."""

    def __init__(self, answers: dict[str, list[Answer]]) -> None:
        self.answers = {path: list(scripted) for path, scripted in answers.items()}
        self.requests: dict[str, list[dict[bytes, bytes]]] = defaultdict(list)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._connections: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._sock.accept()
            except OSError:  # closed: the test is over
                return
            self._connections.add(connection)
            thread = threading.Thread(target=self._answer, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            connection.settimeout(WAIT)
            received = b""
            while b"\r\n\r\n" not in received:
                if not (data := connection.recv(65536)):
                    return
                received += data
            head, _, body = received.partition(b"\r\n\r\n")
            request_line, *lines = head.split(b"\r\n")
            target = request_line.split(b" ")[1]
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in lines)
            }
            length = int(headers.get(b"content-length", b"0"))
            while len(body) < length and (data := connection.recv(65536)):
                body += data  # read whole, so that closing the socket does not reset it
            path = target.split(b"?")[0].decode()
            self.requests[path].append({b":target": target, **headers})
            if scripted := self.answers.get(path):
                answer = scripted.pop(0) if len(scripted) > 1 else scripted[0]
            else:
                answer = Answer([b"no such path"], "text/plain", False, status="404 Not Found")
            connection.sendall(answer.head())
            for piece in answer.pieces:
                framed = b"%x\r\n%s\r\n" % (len(piece), piece) if answer.chunked else piece
                connection.sendall(framed)
            if answer.hold:
                answer.hold.wait(WAIT)
            if answer.chunked and answer.complete:
                connection.sendall(b"0\r\n\r\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept(), which close() alone does not
        self._sock.close()
        for connection in list(self._connections):  # one a browser opened ahead, say
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(WAIT)
