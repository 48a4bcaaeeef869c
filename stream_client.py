"""Step 1 client: print each chunk of a stream the moment it arrives.

Start the server first (python stream_server.py), then:

    python stream_client.py                         # 10 chunks, 0.5 s apart
    python stream_client.py --count 5 --interval 1
    python stream_client.py --url http://127.0.0.1:8000   # a server started with --port 8000
"""

import argparse
import re
import sys
import time
from collections.abc import Iterator

import requests
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

DEFAULT_URL = "http://127.0.0.1:5000"
STEP, SERVER = 1, "stream_server.py"  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0


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


def stream_chunks(
    base: str, count: int, interval: float, read_timeout: float = READ_TIMEOUT
) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    url = f"{base}/stream"
    params = {"count": count, "interval": interval}
    timeout = (3.05, read_timeout)  # (connect, read) in seconds
    connected = False
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, params=params, stream=True, timeout=timeout) as response:
            connected = True
            check_status(response, "text/plain")
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
            raise StreamError(f"the server sent nothing for {read_timeout:g}s") from None
        raise cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a chunked stream as it arrives.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--count", type=int, default=10, help="chunks to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    args = parser.parse_args(argv)

    started = time.monotonic()
    chunks = size = 0
    try:
        for chunk in stream_chunks(base_url(args.url), args.count, args.interval):
            chunks += 1
            size += len(chunk.encode())
            print(f"+{time.monotonic() - started:.2f}s  {chunk.rstrip()}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    print(f"done: {chunks} chunks, {size} bytes in {time.monotonic() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
