"""Step 8 client: chat in a room, printing its messages as they come and posting what you type.

Start the server first (python stream_server_chat.py), then in two terminals:

    python stream_client_chat.py --room lobby --user Alice     # type a line, Enter to post it
    python stream_client_chat.py --room lobby --user Bob
    python stream_client_chat.py --room lobby --user Bob --say "hello"   # post one, and exit
"""

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, visible

# Step 4's reader of Server-Sent Events, as it is: see stream_client_sse.py.
from stream_client_sse import Event, SSEParser

SERVER = Server(8, "stream_server_chat.py", (400, 429))  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's heartbeat (a comment every 15 s).
READ_TIMEOUT = 70.0
RECONNECTS = 5  # attempts in a row before giving up


def bearer(url: str, user: str) -> dict:
    """A freshly minted token for each request: here they are free (step 3's demo minting)."""
    minted = requests.post(f"{url}/generate_token", json={"user_id": user}, timeout=10)
    SERVER.check_status(minted, "application/json")
    return {"Authorization": f"Bearer {minted.json()['access_token']}"}


def stream_chunks(base: str, room: str, user: str, parser: SSEParser) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    url, headers = f"{base}/rooms/{room}/events", {"Accept": "text/event-stream"}
    if parser.last_id:
        headers["Last-Event-ID"] = parser.last_id.encode()  # resume after it; UTF-8, as browsers
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    try:
        headers.update(bearer(base, user))
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 503:  # the server cannot reach Redis: try again later
                response.raise_for_status()
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
        if parser.retry_ms is not None:  # it was there: `retry:` comes first, even to a quiet room
            raise
        raise SERVER.cannot_connect(url, error) from None


def follow(base: str, room: str, user: str) -> Iterator[Event]:
    """Yield the room's events; when the stream ends or breaks, resume after the last one."""
    parser, failures = SSEParser(), 0
    while True:
        parser.reset()  # a new connection starts with no unfinished line or event
        try:
            for text in stream_chunks(base, room, user, parser):
                for event in parser.feed(text):
                    failures = 0  # only a connection that brings events counts as working
                    yield event
            problem = "the server ended the stream"
        except requests.HTTPError:  # the 503 above
            problem = "the server cannot reach Redis"
        except requests.RequestException:  # a drop, a timeout: the events so far are kept
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000 * 2 ** (failures - 1)  # twice as long each time
        print(f"({problem}; resuming after event {visible(parser.last_id or 'none')} in {wait:g}s)")
        time.sleep(wait)


def say(url: str, room: str, user: str, text: str) -> str:
    """Post one message; its id, once the server has stored it."""
    try:
        headers, path = bearer(url, user), f"{url}/rooms/{room}/messages"
    except requests.ConnectionError as error:
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a timeout
        raise StreamError(f"{url} did not answer in time ({error})") from None
    posted = SERVER.post_retrying(path, {"text": text}, headers)  # one Idempotency-Key, every try
    SERVER.check_status(posted, "application/json")
    return posted.json()["id"]


def post_lines(url: str, room: str, user: str) -> None:
    """Post each line typed on stdin, while the stream goes on (in a thread of its own)."""
    for line in filter(str.strip, sys.stdin):
        try:
            say(url, room, user, line.rstrip("\r\n"))
        except StreamError as error:
            print(f"error: {error}", file=sys.stderr)


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
            print(f"sent to {args.room} as {args.user}: id {visible(say(*where, args.say))}")
            return 0
        hint = f"(in {args.room} as {args.user}: type a line, Enter posts it; Ctrl-C leaves)"
        print(hint, file=sys.stderr)
        threading.Thread(target=post_lines, args=where, daemon=True).start()
        for event in follow(*where):
            data = json.loads(event.data)
            if event.type == "message":
                at = time.strftime("%H:%M:%S", time.localtime(data["time"]))
                print(f"{at} {visible(data['user'])}: {visible(data['text'])}", flush=True)
            else:  # reset: messages were lost; overflow: we fell behind; error: Redis is down
                print(visible(f"({event.type}: {event.data})"), flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
