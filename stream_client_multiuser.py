"""Step 2 client: stream several users at once and watch their lines interleave.

Start the server first (python stream_server_multiuser.py), then:

    python stream_client_multiuser.py                     # User1, User2 and User3
    python stream_client_multiuser.py Alice Bob --count 5
"""

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator

import requests

DEFAULT_URL = "http://127.0.0.1:5000"
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
print_lock = threading.Lock()  # one line at a time, or threads garble each other's output


class StreamError(Exception):
    """Something went wrong that the user should read as one line, not a traceback."""


def check_status(response: requests.Response) -> None:
    """Turn an HTTP error status into a StreamError carrying the server's own message."""
    if response.ok:
        return
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = response.reason
    raise StreamError(f"server answered {response.status_code}: {message}")


def stream_chunks(url: str, count: int, interval: float) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived (see step 1)."""
    params = {"count": count, "interval": interval}
    connected = False
    try:
        with requests.get(url, params=params, stream=True, timeout=(3.05, READ_TIMEOUT)) as r:
            connected = True
            check_status(r)
            yield from r.iter_content(chunk_size=None, decode_unicode=True)
    except requests.exceptions.ChunkedEncodingError:
        raise StreamError("the stream was cut off before its end") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise StreamError(
            f"cannot connect to {url}: is the server running? "
            "Start it with: python stream_server_multiuser.py"
        ) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def stream_user(base_url: str, user: str, count: int, interval: float, failures: list) -> None:
    """Print one user's stream, each line prefixed by the user; runs in its own thread."""
    started = time.monotonic()
    try:
        for chunk in stream_chunks(f"{base_url}/stream/{user}", count, interval):
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
    threads = [
        threading.Thread(
            target=stream_user,
            args=(args.url, user, args.count, args.interval, failures),
            daemon=True,  # so Ctrl-C can end the program without waiting for them
        )
        for user in args.users
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            return 1
        status = requests.get(f"{args.url}/status", timeout=(3.05, 10)).json()
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    except (requests.RequestException, ValueError) as error:
        print(f"error: cannot read {args.url}/status: {error}", file=sys.stderr)
        return 1
    print(f"server status: {json.dumps(status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
