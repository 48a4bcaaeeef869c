"""Step 10 client: a live dashboard of the server's host in the terminal, redrawn in place.

Start the server first (python stream_server_dashboard.py), then:

    python stream_client_dashboard.py                   # a table, redrawn in place; Ctrl-C ends it
    python stream_client_dashboard.py --once | head -3  # one line per sample, for scripts
"""

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext

import requests
from rich.live import Live
from rich.table import Column, Table

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url

# Step 4's reader of Server-Sent Events, as it is: see stream_client_sse.py.
from stream_client_sse import Event, SSEParser

SERVER = Server(10, "stream_server_dashboard.py")  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
RECONNECTS = 5  # attempts in a row before giving up
FIELDS = ("cpu_percent", "memory_percent", "bytes_sent_per_s", "bytes_recv_per_s", "viewers")
BARS = "▁▂▃▄▅▆▇█"  # a sparkline: one bar per sample, its height the value


def stream_chunks(url: str, params: dict, parser: SSEParser) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    headers = {"Accept": "text/event-stream"}
    if parser.last_id:
        headers["Last-Event-ID"] = parser.last_id  # resume right after the last event seen
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, params, headers=headers, stream=True, timeout=timeout) as response:
            SERVER.check_status(response, "text/event-stream")
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. decode_unicode uses the
            # charset the server named, and keeps a character split across chunks whole.
            yield from response.iter_content(chunk_size=None, decode_unicode=True)
    except requests.ConnectionError as error:
        if parser.last_id:  # events came from this server: follow() reconnects
            raise
        raise SERVER.cannot_connect(url, error) from None


def follow(url: str, params: dict) -> Iterator[Event]:
    """Yield the events of one stream until its `end` event, reconnecting as EventSource does."""
    parser, failures = SSEParser(), 0
    while True:
        try:
            for text in stream_chunks(url, params, parser):
                for event in parser.feed(text):
                    failures = 0  # only a connection that brings events counts as working
                    yield event
                    if event.type == "end":
                        return
            problem = "the server closed the stream before its end"
        except requests.RequestException:  # a drop, a timeout: the events so far are kept
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000
        print(f"({problem}; resuming after event {parser.last_id or 'none'} in {wait:g}s)")
        time.sleep(wait)


def sample_of(event: Event) -> dict | None:
    """The sample an event carries, if its id and each of its fields is a number; else None."""
    try:
        sample = json.loads(event.data)
        # Only numbers reach the screen: never a string from the network, as it came.
        numbers = all(type(sample[name]) in (int, float) for name in ("time", *FIELDS))
    except (ValueError, KeyError, TypeError):
        return None
    return sample if numbers and event.id.isascii() and event.id.isdigit() else None


def line(number: str, sample: dict) -> str:
    """One sample as one line of text: for --once, and for the table's title."""
    at = time.strftime("%H:%M:%S", time.localtime(sample["time"]))
    cpu, memory, viewers = sample["cpu_percent"], sample["memory_percent"], sample["viewers"]
    text = f"#{number} {at}  cpu {cpu:5.1f}%  mem {memory:5.1f}%"
    text += f"  net up {sample['bytes_sent_per_s'] / 1000:,.1f} kB/s"
    return text + f" down {sample['bytes_recv_per_s'] / 1000:,.1f} kB/s  viewers {viewers}"


def table(number: str, samples: deque) -> Table:
    """The newest values, and a sparkline of each over the samples kept."""
    view = Table("measure", "now", Column("history", min_width=60), title=line(number, samples[-1]))
    for name in FIELDS:
        values = [sample[name] for sample in samples]
        top = 100 if name.endswith("percent") else max(*values, 1)  # rates: to their peak
        bars = "".join(BARS[min(7, max(0, int(value / top * 8)))] for value in values)
        view.add_row(name, f"{values[-1]:,}", bars)
    return view


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Watch the server's host, live.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--history", type=int, default=60, help="past samples to start with")
    parser.add_argument("--once", action="store_true", help="one line per sample, no redrawing")
    args = parser.parse_args(argv)
    samples: deque[dict] = deque(maxlen=60)  # what the sparklines show: a minute at 1 s
    try:
        with Live(auto_refresh=False, transient=False) if not args.once else nullcontext() as live:
            for event in follow(f"{base_url(args.url)}/events", {"history": args.history}):
                if event.type != "sample" or (sample := sample_of(event)) is None:
                    continue  # another kind of event, or not one of this server's samples
                samples.append(sample)
                if args.once:
                    print(line(event.id, sample), flush=True)
                else:
                    live.update(table(event.id, samples), refresh=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    except BrokenPipeError:  # --once | head: the reader has enough, so stop quietly too
        sys.stdout = None  # or Python would fail again, flushing it at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
