"""Step 7 client: chat in a room, printing its messages as they come and posting what you type.

Start the server first (python stream_server_chat.py), then in two terminals:

    python stream_client_chat.py --room lobby --user Alice     # type a line, Enter to post it
    python stream_client_chat.py --room lobby --user Bob
    python stream_client_chat.py --room lobby --user Bob --say "hello"   # post one, and exit
"""

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url

SERVER = Server(7, "stream_server_chat.py")  # named in the error messages
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


def bearer(url: str, user: str) -> dict:
    """A freshly minted token for each request: here they are free (step 3's demo minting)."""
    minted = requests.post(f"{url}/generate_token", json={"user_id": user}, timeout=10)
    SERVER.check_status(minted, "application/json")
    return {"Authorization": f"Bearer {minted.json()['access_token']}"}


def follow(base: str, room: str, user: str) -> Iterator[Event]:
    """Yield the room's events; when the stream ends or breaks, resume after the last one."""
    url, parser, failures = f"{base}/rooms/{room}/events", SSEParser(), 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if parser.last_id:
            headers["Last-Event-ID"] = parser.last_id  # resume right after the last event seen
        try:
            headers.update(bearer(base, user))
            with requests.get(
                url, headers=headers, stream=True, timeout=(3.05, READ_TIMEOUT)
            ) as r:
                problem = "the server cannot reach Redis"  # it answers 503: try again later
                if r.status_code != 503:
                    SERVER.check_status(r, "text/event-stream")
                    for text in r.iter_content(chunk_size=None, decode_unicode=True):
                        for event in parser.feed(text):
                            failures = 0  # only a connection that brings events counts as working
                            yield event
                    problem = "the server ended the stream"
        except requests.RequestException as error:
            # Never reached the server (it sends `retry:` first, even to an empty room): say so.
            if parser.retry_ms is None and isinstance(error, requests.ConnectionError):
                raise SERVER.cannot_connect(url, error) from None
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000 * 2 ** (failures - 1)  # twice as long each time
        print(f"({problem}; resuming after event {parser.last_id or 'none'} in {wait:g}s)")
        time.sleep(wait)


def say(url: str, room: str, user: str, text: str) -> str:
    """Post one message; its id, once the server has stored it."""
    try:
        headers, body = bearer(url, user), {"text": text}
        posted = requests.post(
            f"{url}/rooms/{room}/messages", json=body, headers=headers, timeout=10
        )
    except requests.ConnectionError as error:
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a timeout
        raise StreamError(f"{url} did not answer in time ({error})") from None
    SERVER.check_status(posted, "application/json")
    return posted.json()["id"]


def post_lines(url: str, room: str, user: str) -> None:
    """Post each line typed on stdin, while the stream goes on (in a thread of its own)."""
    for line in filter(str.strip, sys.stdin):
        try:
            say(url, room, user, line.rstrip("\r\n"))
        except StreamError as error:
            print(f"error: not sent: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat in a room: print it, post typed lines.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--room", default="lobby", help="the room to join (default: lobby)")
    parser.add_argument("--user", default="User1", help="who you are (default: User1)")
    parser.add_argument("--say", metavar="TEXT", help="post TEXT, and exit")
    args = parser.parse_args(argv)

    try:
        where = (base_url(args.url), args.room, args.user)
        if args.say is not None:
            message_id = say(*where, args.say)
            print(f"sent to {args.room} as {args.user}: id {message_id}")
            return 0
        hint = f"(in {args.room} as {args.user}: type a line, Enter posts it; Ctrl-C leaves)"
        print(hint, file=sys.stderr)
        threading.Thread(target=post_lines, args=where, daemon=True).start()
        for event in follow(*where):
            data = json.loads(event.data)
            if event.type == "message":
                at = datetime.fromtimestamp(data["time"]).strftime("%H:%M:%S")
                print(f"{at} {data['user']}: {data['text']}", flush=True)
            else:  # reset: messages were lost; overflow: we fell behind; error: Redis is down
                print(f"({event.type}: {event.data})", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
