"""See chunked transfer encoding on the wire: an HTTP/1.1 client on a bare socket.

requests hides the framing; this script prints it. Each chunk arrives as a
hexadecimal size line, the payload, and CRLF; a chunk of size 0 ends the body.

    python show_chunks.py "http://127.0.0.1:5000/stream?count=3&interval=1"
    python show_chunks.py URL -H "Authorization: Bearer $TOKEN"
"""

import argparse
import socket
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import urlsplit

# Headers are text from the network: printed with their control characters escaped.
from client_errors import visible


class FramingError(Exception):
    """The bytes on the wire are not valid chunked framing."""


def send_request(url: str, headers: list[str]) -> tuple[socket.socket, BinaryIO]:
    """Connect and send a GET request; return the socket and a file to read the answer from."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close", *headers]
    # The timeout bounds each read, so it must outlast the stream's longest interval.
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=70)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return sock, sock.makefile("rb")


def read_head(wire: BinaryIO) -> list[str]:
    """Read the status line and the header lines, up to the blank line that ends them."""
    lines = []
    while (line := wire.readline()) not in (b"\r\n", b""):
        lines.append(line.decode("latin-1").rstrip("\r\n"))
    if not lines or not lines[0].startswith("HTTP/"):
        raise FramingError(f"not an HTTP response: {lines[:1]}")
    return lines


def read_chunks(wire: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    """Yield (size line, payload) for each chunk as it arrives, the final zero-size one last."""
    while True:
        size_line = wire.readline()
        if not size_line.endswith(b"\r\n"):
            raise FramingError("the connection closed before the final zero-size chunk")
        try:
            size = int(size_line.split(b";")[0], 16)  # ";..." would be a chunk extension
        except ValueError:
            raise FramingError(f"bad chunk size line {size_line!r}") from None
        if size == 0:
            while wire.readline() not in (b"\r\n", b""):  # skip trailer fields, if any
                pass
            yield size_line, b""
            return
        payload = wire.read(size)
        if len(payload) != size or wire.read(2) != b"\r\n":
            raise FramingError(f"chunk of {size} bytes cut short or not followed by CRLF")
        yield size_line, payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print an HTTP response's chunk framing.")
    parser.add_argument("url", help="an http:// URL to GET")
    parser.add_argument("-H", "--header", action="append", default=[], help="extra header line")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        sock, wire = send_request(args.url, args.header)
        with sock, wire:
            head = read_head(wire)
            print("\n".join(map(visible, head)))
            if "transfer-encoding: chunked" not in (line.lower() for line in head):
                print(f"(not chunked) {wire.read()!r}")
                return 0
            for size_line, payload in read_chunks(wire):
                elapsed = time.monotonic() - started
                print(f"+{elapsed:.3f}s  size {size_line!r} = {len(payload)} bytes  {payload!r}")
    except (OSError, ValueError, FramingError) as error:
        print(f"error: {args.url}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
