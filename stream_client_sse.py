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
from collections import namedtuple
from collections.abc import Iterator

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, visible

SERVER = Server(4, "stream_server_sse.py")  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
LINE_END = re.compile(r"\r\n|\r|\n")  # SSE allows all three
RECONNECTS = 5  # attempts in a row before giving up
Event = namedtuple("Event", "type data id")  # what SSEParser.feed() returns, one per event


class SSEParser:
    """Turns text, fed in pieces of any size, into events, by the rules of the HTML standard."""

    def __init__(self) -> None:
        self.last_id = ""  # what to send as Last-Event-ID when reconnecting
        self.retry_ms: int | None = None  # how long the server asks us to wait before that
        self.reset()

    def reset(self) -> None:
        """A new connection: nothing unfinished on the last one (a line, an event) carries over."""
        self._pending, self._type, self._data, self._cr, self._id = "", "", [], False, self.last_id

    def feed(self, text: str) -> list[Event]:
        skip = self._cr and text.startswith("\n")  # a CRLF cut in two: its CR ended the line
        self._cr = text.endswith("\r") or (self._cr and not text)
        *lines, self._pending = LINE_END.split(self._pending + text[skip:])
        return [event for line in lines if (event := self._line(line))]

    def _line(self, line: str) -> Event | None:
        if not line:  # a blank line ends the event
            # Only now is its id the last one seen: an event cut off by a drop was never seen.
            self.last_id, data, kind = self._id, self._data, self._type or "message"
            self._data, self._type = [], ""
            return Event(kind, "\n".join(data), self.last_id) if data else None
        name, _, value = line.partition(":")  # a comment (": keep-alive") has no name: ignored
        value = value.removeprefix(" ")  # only one space after the colon is part of the syntax
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id = value  # the event's id: last_id once the event is dispatched
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)


def stream_chunks(url: str, params: dict, parser: SSEParser) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    headers = {"Accept": "text/event-stream"}
    if parser.last_id:
        headers["Last-Event-ID"] = parser.last_id.encode()  # resume after it; UTF-8, as browsers
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, params, headers=headers, stream=True, timeout=timeout) as response:
            SERVER.check_status(response, "text/event-stream")
            # Always UTF-8, whatever charset the header names, less a byte order mark at the start.
            response.encoding = "utf-8-sig"
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. decode_unicode uses the
            # encoding set above, and keeps a character split across chunks whole.
            yield from response.iter_content(chunk_size=None, decode_unicode=True)
    except requests.ConnectionError as error:
        if parser.last_id:  # events came from this server: follow() reconnects
            raise
        raise SERVER.cannot_connect(url, error) from None


def follow(url: str, params: dict) -> Iterator[Event]:
    """Yield the events of one stream until its `end` event, reconnecting as EventSource does."""
    parser, failures = SSEParser(), 0
    while True:
        parser.reset()  # a new connection starts with no unfinished line or event
        try:
            for text in stream_chunks(url, params, parser):
                for event in parser.feed(text):
                    failures = 0  # only a connection that brings events counts as working
                    yield event
                    if event.type == "end":
                        return
            problem = "the server closed the stream before its end"
        except requests.RequestException:  # a drop, a timeout: the events so far are kept
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000
        print(f"({problem}; resuming after event {visible(parser.last_id or 'none')} in {wait:g}s)")
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
            if event.type == "token":  # words join into the text as they come
                print(visible(event.data), end="", flush=True)
                continue
            if event.type == "end" and args.tokens:
                print()  # finish the line of words
            what = "end" if event.type == "end" else visible(f"#{event.id} {event.type}")
            print(f"+{time.monotonic() - started:.2f}s  {what}: {visible(event.data)}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
