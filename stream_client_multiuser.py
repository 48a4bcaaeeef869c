"""Step 2 client: stream several users at once and watch their lines interleave.

Start the server first (python stream_server_multiuser.py), then:

    python stream_client_multiuser.py                     # User1, User2 and User3
    python stream_client_multiuser.py Alice Bob --count 5
"""

import argparse
import json
import re
import sys
import threading
import time
from collections.abc import Iterator

import requests
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

DEFAULT_URL = "http://127.0.0.1:5000"
STEP, SERVER = 2, "stream_server_multiuser.py"  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
print_lock = threading.Lock()  # one line at a time, or threads garble each other's output


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


def stream_chunks(url: str, count: int, interval: float) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived (see step 1)."""
    params = {"count": count, "interval": interval}
    connected = False
    try:
        with requests.get(url, params=params, stream=True, timeout=(3.05, READ_TIMEOUT)) as r:
            connected = True
            check_status(r, "text/plain")
            yield from r.iter_content(chunk_size=None, decode_unicode=True)
    except requests.exceptions.ChunkedEncodingError:
        raise StreamError("the stream was cut off before its end") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def server_status(base: str) -> dict:
    """Who is streaming now. Asked first too: a missing or wrong server gets one error line."""
    try:
        response = requests.get(f"{base}/status", timeout=(3.05, 10))
    except requests.ConnectionError as error:
        raise cannot_connect(f"{base}/status", error) from None
    except requests.RequestException as error:
        raise StreamError(str(error)) from None
    check_status(response, "application/json")
    return response.json()


def stream_user(base: str, user: str, count: int, interval: float, failures: list) -> None:
    """Print one user's stream, each line prefixed by the user; runs in its own thread."""
    started = time.monotonic()
    try:
        for chunk in stream_chunks(f"{base}/stream/{user}", count, interval):
            with print_lock:
                print(f"[{user}] +{time.monotonic() - started:.2f}s  {chunk.rstrip()}", flush=True)
    except StreamError as error:
        failures.append(user)
        with print_lock:
            print(f"error: [{user}] {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream several users at once.")
    parser.add_argument("users", nargs="*", default=["User1", "User2", "User3"])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--count", type=int, default=10, help="chunks per user")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    args = parser.parse_args(argv)

    failures: list[str] = []
    try:
        base = base_url(args.url)
        server_status(base)
        job = (args.count, args.interval, failures)
        threads = [  # daemon threads: Ctrl-C can end the program without waiting for them
            threading.Thread(target=stream_user, args=(base, user, *job), daemon=True)
            for user in args.users
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            return 1
        status = server_status(base)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    print(f"server status: {json.dumps(status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
