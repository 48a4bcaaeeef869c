"""Step 5 client: watch a WebSocket stream and steer it while it flows.

Start the server first (python stream_server_websocket.py), then type commands
while the chunks arrive: pause, resume, interval 0.2, stop.

    python stream_client_websocket.py
    python stream_client_websocket.py --commands pause resume "interval 0.1" stop
"""

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlencode

import requests
import websocket

DEFAULT_URL = "http://127.0.0.1:5000"
READ_TIMEOUT = 70.0  # longer than the longest interval the server allows (60 s)
print_lock = threading.Lock()  # two threads print: the reader and the command sender


class StreamError(Exception):
    """Something went wrong that the user should read as one line, not a traceback."""


def say(started: float, text: str) -> None:
    with print_lock:
        print(f"+{time.monotonic() - started:.2f}s  {text}", flush=True)


def server_message(body: bytes | str | None, fallback: str) -> str:
    """The server's own explanation from a JSON error body, or `fallback`."""
    try:
        answer = json.loads(body or "")
        return answer.get("error_description") or answer["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return fallback


def mint_token(base_url: str, user: str) -> str:
    """Ask the server for a token, as in step 3."""
    try:
        response = requests.post(f"{base_url}/generate_token", json={"user_id": user}, timeout=10)
    except requests.RequestException:
        raise StreamError(
            f"cannot connect to {base_url}: is the server running? "
            "Start it with: python stream_server_websocket.py"
        ) from None
    if not response.ok:
        message = server_message(response.content, response.reason)
        raise StreamError(f"server answered {response.status_code}: {message}")
    return response.json()["access_token"]


def connect(base_url: str, token: str, count: int, interval: float) -> websocket.WebSocket:
    """Open the WebSocket, showing the token on the handshake (an ordinary HTTP request)."""
    query = urlencode({"count": count, "interval": interval})
    url = f"{base_url.replace('http', 'ws', 1)}/ws?{query}"  # http:// -> ws://, https:// -> wss://
    try:
        return websocket.create_connection(
            url, header=[f"Authorization: Bearer {token}"], timeout=READ_TIMEOUT
        )
    except websocket.WebSocketBadStatusException as error:  # refused before the upgrade
        message = server_message(error.resp_body, str(error))
        raise StreamError(
            f"server refused the connection ({error.status_code}): {message}"
        ) from None
    except (OSError, websocket.WebSocketException) as error:
        raise StreamError(f"cannot open {url}: {error}") from None


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


def send_commands(
    ws: websocket.WebSocket, lines: Iterable[str], every: float, started: float
) -> None:
    """Send each command line to the server; runs in its own thread beside the reader."""
    for line in lines:
        if every:
            time.sleep(every)  # scripted commands go out one by one, so each effect shows
        if not line.strip():
            continue
        say(started, f"> {line.strip()}")
        try:
            ws.send(command_message(line))
        except (OSError, websocket.WebSocketException):
            return  # the stream has ended; the reader reports how


def describe(message: dict) -> str:
    kind = message.get("type")
    if kind == "chunk":
        return message["text"]
    if kind == "ack":
        state = "paused" if message["paused"] else "running"
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
    args = parser.parse_args(argv)

    try:
        token = args.token or mint_token(args.url, args.user)
        ws = connect(args.url, token, args.count, args.interval)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    started = time.monotonic()
    lines, every = (args.commands, args.every) if args.commands is not None else (sys.stdin, 0)
    threading.Thread(target=send_commands, args=(ws, lines, every, started), daemon=True).start()
    try:
        while True:
            message = json.loads(ws.recv())
            say(started, f"< {describe(message)}")
            if message["type"] == "end":
                return 0
    except websocket.WebSocketTimeoutException:
        print(f"error: the server sent nothing for {READ_TIMEOUT:g}s", file=sys.stderr)
    except (OSError, ValueError, websocket.WebSocketException):  # recv() gives "" once closed
        print("error: the connection closed before the stream's end", file=sys.stderr)
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    finally:
        ws.close()
    return 1


if __name__ == "__main__":
    sys.exit(main())
