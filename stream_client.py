"""Step 1 client: print each chunk of a stream the moment it arrives.

Start the server first (python stream_server.py), then:

    python stream_client.py                         # 10 chunks, 0.5 s apart
    python stream_client.py --count 5 --interval 1
    python stream_client.py --url http://127.0.0.1:8000   # a server started with --port 8000
"""

import argparse
import sys
import time
from collections.abc import Iterator

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, visible

SERVER = Server(1, "stream_server.py")  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a chunked stream as it arrives.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--count", type=int, default=10, help="chunks to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    args = parser.parse_args(argv)

    started = time.monotonic()
    chunks = size = 0
    try:
        base = base_url(args.url)
        for chunk in stream_chunks(f"{base}/stream", args.count, args.interval):
            chunks += 1
            size += len(chunk.encode())
            print(f"+{time.monotonic() - started:.2f}s  {visible(chunk.rstrip())}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    print(f"done: {chunks} chunks, {size} bytes in {time.monotonic() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
