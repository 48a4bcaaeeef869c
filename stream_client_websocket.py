"""Step 5 client: watch a WebSocket stream and steer it while it flows.

Start the server first (python stream_server_websocket.py), then type commands
while the chunks arrive: pause, resume, interval 0.2, stop.

    python stream_client_websocket.py
    python stream_client_websocket.py --commands pause resume "interval 0.1" stop
    python stream_client_websocket.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlencode, urlsplit

import requests
import websocket
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import StreamError

DEFAULT_URL = "http://127.0.0.1:5000"
SERVER = "stream_server_websocket.py"  # named in the error messages
READ_TIMEOUT = 70.0  # longer than the longest interval the server allows (60 s)
COMMANDS = "pause, resume, interval <seconds>, stop"
print_lock = threading.Lock()  # two threads print: the reader and the command sender


def server_message(body: bytes | str | None, fallback: str) -> str:
    """The server's own explanation from a JSON error body, or `fallback`."""
    try:
        answer = json.loads(body or "")
        return answer.get("error_description") or answer["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return fallback


def cannot_connect(base: str, error: Exception) -> StreamError:
    """Say why the server gave no answer, as far as the client can tell."""
    if isinstance(error, requests.exceptions.SSLError | ssl.SSLCertVerificationError):
        why = "if a local CA signed it, pass that CA's certificate with --cacert"
        return StreamError(f"cannot verify the certificate of {base}: {why}")
    # Taken, then dropped unanswered (urllib3 calls that a ProtocolError) rather than refused:
    # what a server started with --cert does with plain HTTP, since it speaks HTTPS only.
    cause = error.args[0] if isinstance(error, requests.ConnectionError) else error
    dropped = isinstance(cause, ProtocolError | websocket.WebSocketConnectionClosedException) or (
        isinstance(cause, ConnectionError) and not isinstance(cause, ConnectionRefusedError)
    )
    if dropped and base.startswith("http://"):
        why = "if the server was started with --cert, it speaks HTTPS only"
        return StreamError(
            f"{base} closed the connection without answering: {why}: use --url "
            + base.replace("http", "https", 1)
        )
    return StreamError(
        f"cannot connect to {base}: is the server running? Start it with: python {SERVER}"
    )


def not_step_5(base: str, answer: str) -> StreamError:
    """Another server answers there, such as an earlier step's still running on the port."""
    return StreamError(f"{base} is not step 5's server ({answer}): start it with python {SERVER}")


def mint_token(base: str, user: str, verify: str | bool) -> str:
    """Ask the server for a token, as in step 3."""
    try:
        response = requests.post(
            f"{base}/generate_token", json={"user_id": user}, timeout=10, verify=verify
        )
    except requests.RequestException as error:
        raise cannot_connect(base, error) from None
    if response.status_code in (404, 405):  # no such route: another step's server
        raise not_step_5(base, f"POST /generate_token answered {response.status_code}")
    if not response.ok:
        message = server_message(response.content, response.reason)
        raise StreamError(f"server answered {response.status_code}: {message}")
    try:
        return response.json()["access_token"]
    except (ValueError, KeyError, TypeError):
        raise not_step_5(base, "POST /generate_token answered with no token") from None


def connect(base: str, token: str, query: dict, cacert: str | None) -> websocket.WebSocket:
    """Open the WebSocket, showing the token on the handshake (an ordinary HTTP request)."""
    url = f"{base.replace('http', 'ws', 1)}/ws?{urlencode(query)}"  # https:// -> wss://
    # The token goes in a header, never in the URL: URLs end up in logs and histories.
    headers = [f"Authorization: Bearer {token}"]
    sslopt = {"ca_certs": cacert} if cacert else {}  # without --cacert: the system's CAs
    try:
        return websocket.create_connection(url, header=headers, timeout=READ_TIMEOUT, sslopt=sslopt)
    except websocket.WebSocketBadStatusException as error:  # refused before the upgrade
        if error.status_code in (404, 405) or error.status_code < 400:  # no upgrade, no refusal
            raise not_step_5(base, f"GET /ws answered {error.status_code}") from None
        refusal = f"({error.status_code}): {server_message(error.resp_body, str(error))}"
        raise StreamError(f"server refused the connection {refusal}") from None
    except (OSError, websocket.WebSocketException) as error:
        raise cannot_connect(base, error) from None


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
    with print_lock:
        print(f"+{time.monotonic() - started:.2f}s  {text}", flush=True)


def send_commands(ws: websocket.WebSocket, lines: Iterable[str], every: float, started) -> None:
    """Send each command line to the server; runs in its own thread beside the reader."""
    for line in lines:
        time.sleep(every)  # scripted commands go out one by one, so each effect shows
        if line.strip():
            say(started, f"> {line.strip()}")
            try:
                ws.send(command_message(line))
            except (OSError, websocket.WebSocketException):
                return  # the stream has ended; the reader reports how


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
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc or url.path.strip("/") or url.query:
        # Not ws://...: the client makes the WebSocket URL, ws://host:port/ws, itself.
        parser.error(
            f"--url is the server's base URL, such as {DEFAULT_URL} (https:// for a server "
            f"started with --cert), not {args.url}: the client opens /ws itself"
        )
    if args.cacert and not os.path.isfile(args.cacert):
        parser.error(f"--cacert {args.cacert}: no such file")
    # Certificates are always checked: with --cacert, against that CA; without, against the
    # system's. Never verify=False: it accepts any certificate, so anyone on the path could
    # pose as the server and collect the token.
    verify = args.cacert or True

    try:
        base = args.url.rstrip("/")
        token = args.token or mint_token(base, args.user, verify)
        ws = connect(base, token, {"count": args.count, "interval": args.interval}, args.cacert)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.commands is None:
        print(f"type a command and Enter while the chunks arrive: {COMMANDS}", flush=True)
    started = time.monotonic()
    # Two threads: this one prints what the server sends while the other sends what the user
    # types, so that neither waits for the other.
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
