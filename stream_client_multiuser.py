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

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, visible

SERVER = Server(2, "stream_server_multiuser.py")  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
print_lock = threading.Lock()  # one line at a time, or threads garble each other's output


def stream_chunks(url: str, count: int, interval: float) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    params = {"count": count, "interval": interval}
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    connected = False
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, params=params, stream=True, timeout=timeout) as response:
            connected = True
            SERVER.check_status(response, "text/plain")
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. decode_unicode uses the
            # charset the server named, and keeps a character split across chunks whole.
            yield from response.iter_content(chunk_size=None, decode_unicode=True)
    except requests.exceptions.ChunkedEncodingError:
        raise StreamError("the stream was cut off before its end") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def server_status(base: str) -> dict:
    """Who is streaming now. Asked first too: a missing or wrong server gets one error line."""
    url = f"{base}/status"
    try:
        response = requests.get(url, timeout=(3.05, 10))
    except requests.ConnectionError as error:
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None
    SERVER.check_status(response, "application/json")
    return response.json()


def stream_user(base: str, user: str, count: int, interval: float, failures: list) -> None:
    """Print one user's stream, each line prefixed by the user; runs in its own thread."""
    started = time.monotonic()
    try:
        for chunk in stream_chunks(f"{base}/stream/{user}", count, interval):
            with print_lock:
                text = visible(chunk.rstrip())  # from the network: no control character goes out
                print(f"[{user}] +{time.monotonic() - started:.2f}s  {text}", flush=True)
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
