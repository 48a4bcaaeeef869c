"""Step 5 client: get a token, then watch a WebSocket stream and steer it while it flows.

Start the server first (python stream_server_websocket.py), then type commands while the
chunks arrive (pause, resume, interval 0.2, stop), or give them with --commands:

    python stream_client_websocket.py                   # mints a token for User1
    python stream_client_websocket.py --commands pause resume "interval 0.1" stop
    python stream_client_websocket.py --token "$TOKEN"  # one minted with curl
    python stream_client_websocket.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, suppress
from functools import partial
from urllib.parse import urlencode

import requests
import websocket
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, ca_certs, visible

# Named in the error messages. It refuses a bad token with a 401 that says why, as it refuses
# bad input with a 400; and it may speak HTTPS, so the client says when the schemes differ.
SERVER = Server(5, "stream_server_websocket.py", refusals=(400, 401), https=True)
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
# Paused, the stream sends no chunks; the server's pings, every 25 s, keep it within it.
READ_TIMEOUT = 70.0
# What the server obeys; anything else gets an error message back, and the stream goes on.
COMMANDS = "pause, resume, interval <seconds>, stop"
print_lock = threading.Lock()  # two threads print: the reader and the command sender


def connect(
    url: str, token: str, count: int, interval: float, verify: str | bool
) -> websocket.WebSocket:
    """Open the WebSocket at `url` (ws:// or wss://) for `count` chunks, `interval` s apart."""
    params = {"count": count, "interval": interval}
    # The token goes in a header, never in the URL: URLs end up in logs and histories.
    headers = {"Authorization": f"Bearer {token}"}
    sslopt = {"ca_certs": verify} if isinstance(verify, str) else {}  # {}: the system's CAs
    try:
        # The handshake is an HTTP GET that asks for an upgrade: a server can still refuse it
        # with a status that says why, as step 3's refuses GET /stream.
        return websocket.create_connection(
            f"{url}?{urlencode(params)}", header=headers, timeout=READ_TIMEOUT, sslopt=sslopt
        )
    except websocket.WebSocketBadStatusException as error:  # an HTTP answer, not the upgrade
        kind = (error.resp_headers or {}).get("content-type", "")
        answer = partial(json.loads, error.resp_body)
        raise SERVER.refusal(url, error.status_code, kind, answer, error.status_message) from None
    # No answer at all: told in requests' terms, which client_errors.py reads. A failed TLS
    # handshake is an SSLError there, a connection closed unanswered a ProtocolError.
    except ssl.SSLError as error:
        raise SERVER.cannot_connect(url, requests.exceptions.SSLError(error)) from None
    except (OSError, websocket.WebSocketException) as error:
        closed = isinstance(error, websocket.WebSocketConnectionClosedException)
        error = requests.ConnectionError(ProtocolError(error) if closed else error)
        raise SERVER.cannot_connect(url, error) from None


def mint_token(base: str, user: str, verify: str | bool) -> str:
    """Ask the server for a token, as the README's curl command does."""
    return SERVER.post_json(f"{base}/generate_token", {"user_id": user}, verify)["access_token"]


def messages(ws: websocket.WebSocket) -> Iterator[dict]:
    """Yield the server's messages, each as soon as it has arrived, up to the "end" one."""
    try:
        with closing(ws):
            # The server closes the connection after "end": it is the last message to read.
            while (message := json.loads(ws.recv()))["type"] != "end":
                yield message
            yield message
    except websocket.WebSocketTimeoutException:
        raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
    # Closed before the end: recv() then returns "", which is not JSON (a ValueError).
    except (OSError, ValueError, websocket.WebSocketException):
        raise StreamError("the stream was cut off before its end") from None


def command_message(line: str) -> str:
    """Turn what the user typed ("pause", "interval 0.2") into the JSON the server expects."""
    name, _, argument = line.strip().partition(" ")
    command: dict = {"command": name}
    if name == "interval":
        try:
            command["seconds"] = float(argument)
        except ValueError:
            command["seconds"] = argument  # the server says what is wrong with it
    return json.dumps(command)


def say(started: float, text: str) -> None:
    with print_lock:  # print() writes the text and the newline apart: two lines could mix
        print(f"+{time.monotonic() - started:.2f}s  {visible(text)}", flush=True)


def send_commands(ws: websocket.WebSocket, lines: Iterable[str], every: float, started) -> None:
    """Send each command line to the server; runs in its own thread beside the reader."""
    with suppress(OSError, websocket.WebSocketException):  # ended: the reader says how
        for line in filter(str.strip, lines):
            time.sleep(every)  # scripted commands go out one by one, so each effect shows
            say(started, f"> {line.strip()}")
            ws.send(command_message(line))


def describe(message: dict) -> str:
    """One line for a message from the server."""
    kind = message.get("type")
    if kind == "chunk":
        return message["text"]
    if kind == "ack":
        state = "stopping" if message["stopped"] else "paused" if message["paused"] else "running"
        return f"ack {message['command']}: {state}, interval {message['interval']}s"
    if kind == "end":
        return f"end: {message['sent']} chunks sent"
    return f"error from the server: {message.get('error')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream over a WebSocket and steer it.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint a token for")
    parser.add_argument("--token", help="use this token instead of minting one")
    parser.add_argument("--count", type=int, default=20, help="chunks to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    parser.add_argument("--commands", nargs="*", help="send these instead of reading the keyboard")
    parser.add_argument("--every", type=float, default=1.5, help="seconds between --commands")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    # Never verify=False: it accepts any certificate, so anyone posing as the server gets the token.
    verify = ca_certs(parser, args.cacert)  # always checked: against --cacert's CA, or the system's

    try:
        base = base_url(args.url)
        token = args.token or mint_token(base, args.user, verify)
        # Not ws:// in --url: the client makes the WebSocket's URL (wss:// for https://) itself.
        url = base.replace("http", "ws", 1) + "/ws"
        ws = connect(url, token, args.count, args.interval, verify)
        if args.commands is None:  # then they come from the keyboard, as they are typed
            print(f"type a command and Enter while the chunks arrive: {COMMANDS}", flush=True)
            args.commands, args.every = sys.stdin, 0
        started = time.monotonic()
        # Two threads: this one prints what the server sends while the other sends what the
        # user types, so that neither waits for the other.
        steering = (ws, args.commands, args.every, started)
        threading.Thread(target=send_commands, args=steering, daemon=True).start()
        for message in messages(ws):
            say(started, f"< {describe(message)}")
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    return 0


if __name__ == "__main__":
    sys.exit(main())
