"""Step 4 client: read Server-Sent Events as they arrive, and resume after a dropped connection.

Start the server first (python stream_server_sse.py), then:

    python stream_client_sse.py                        # User1's feed, one event a second
    python stream_client_sse.py Alice --count 5 --interval 0.5
    python stream_client_sse.py --tokens               # a text, word by word
"""

import argparse
import re
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

import requests
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

DEFAULT_URL = "http://127.0.0.1:5000"
STEP, SERVER = 4, "stream_server_sse.py"  # named in the error messages
READ_TIMEOUT = 70.0  # longer than the longest silence: the server sends a comment every 15 s
LINE_END = re.compile(r"\r\n|\r|\n")  # SSE allows all three
RECONNECTS = 5  # attempts in a row before giving up


class Event(NamedTuple):
    type: str
    data: str
    id: str


class SSEParser:
    """Turns text, fed in pieces of any size, into events, by the rules of the HTML standard."""

    def __init__(self) -> None:
        self.last_id = ""  # what to send as Last-Event-ID when reconnecting
        self.retry_ms: int | None = None  # how long the server asks us to wait before that
        self._pending = ""
        self._type = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        # A CR at the very end may be the first half of a CRLF: keep it for the next piece.
        held = "\r" if self._pending.endswith("\r") else ""
        *lines, rest = LINE_END.split(self._pending.removesuffix(held))
        self._pending = rest + held
        return [event for line in lines if (event := self._line(line))]

    def _line(self, line: str) -> Event | None:
        if not line:  # a blank line ends the event
            return self._dispatch()
        if line.startswith(":"):  # a comment, such as a keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")  # only one space after the colon is part of the syntax
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, kind = self._data, self._type or "message"
        self._data, self._type = [], ""
        return Event(kind, "\n".join(data), self.last_id) if data else None


class StreamError(Exception):
    """Something went wrong that the user should read as one line, not a traceback."""


def start_it(problem: str) -> StreamError:
    """A StreamError for a missing or wrong server, saying which one this step needs."""
    return StreamError(f"{problem} Start it with: python {SERVER}")


def base_url(url: str) -> str:
    """--url without its trailing slash; a StreamError unless it is a server's base URL."""
    if re.fullmatch(r"https?://[^/?#\s]+/*", url):
        return url.rstrip("/")
    raise StreamError(f"--url takes the server's http(s) base URL such as {DEFAULT_URL}, not {url}")


def cannot_connect(url: str, error: requests.ConnectionError) -> StreamError:
    """Say why no answer came: nothing listening, or a server that speaks no plain HTTP."""
    if isinstance(error.args[0], ProtocolError):  # connected, then closed unanswered: HTTPS, say
        return start_it(f"{url} gave no HTTP answer: it is not step {STEP}'s server.")
    return start_it(f"cannot connect to {url}: is the server running?")


def check_status(response: requests.Response, content_type: str) -> None:
    """Let this step's answer through; make anything else a StreamError that says what it is."""
    status, kind = response.status_code, response.headers.get("Content-Type", "")
    if response.ok and kind.startswith(content_type):
        return
    # This step's server refuses bad input with a 400 (a 5xx: it failed, or a proxy did). Any
    # other answer is another server's, often another step's: a 404, a 401, another type.
    if status != 400 and status < 500:
        answer = f"{status} {kind}" if response.ok else status
        url = response.url.partition("?")[0]
        raise start_it(f"{url} answered {answer}: it is not step {STEP}'s server.")
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = response.reason
    raise StreamError(f"server answered {status}: {message}")


def follow(url: str, params: dict) -> Iterator[Event]:
    """Yield the events of one stream until its `end` event, reconnecting as EventSource does."""
    parser, failures = SSEParser(), 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if parser.last_id:
            headers["Last-Event-ID"] = parser.last_id  # resume right after the last event seen
        try:
            with requests.get(
                url, params, headers=headers, stream=True, timeout=(3.05, READ_TIMEOUT)
            ) as r:
                check_status(r, "text/event-stream")
                for text in r.iter_content(chunk_size=None, decode_unicode=True):
                    for event in parser.feed(text):
                        failures = 0  # only a connection that brings events counts as working
                        yield event
                        if event.type == "end":
                            return
            problem = "the server closed the stream before its end"
        except requests.RequestException as error:
            if not parser.last_id and isinstance(error, requests.ConnectionError):
                raise cannot_connect(url, error) from None
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000
        print(f"({problem}; resuming after event {parser.last_id or 'none'} in {wait:g}s)")
        time.sleep(wait)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print Server-Sent Events as they arrive.")
    parser.add_argument("user", nargs="?", default="User1", help="whose feed to follow")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--count", type=int, default=10, help="events to ask for")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between events")
    parser.add_argument("--tokens", action="store_true", help="stream a text word by word")
    args = parser.parse_args(argv)

    path = "tokens" if args.tokens else f"events/{args.user}"
    params = {"interval": 0.15} if args.tokens else {"count": args.count, "interval": args.interval}
    started = time.monotonic()
    try:
        for event in follow(f"{base_url(args.url)}/{path}", params):
            elapsed = f"+{time.monotonic() - started:.2f}s"
            if event.type == "token":
                print(event.data, end="", flush=True)  # words join into the text as they come
            elif event.type == "end":
                if args.tokens:
                    print()  # finish the line of words
                print(f"{elapsed}  end: {event.data}")
            else:
                print(f"{elapsed}  #{event.id} {event.type}: {event.data}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
