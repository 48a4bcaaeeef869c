"""Step 11 client: start a long job, or follow one, and redraw its progress as events arrive.

Start the server first (python stream_server_jobs.py), then:

    python stream_client_jobs.py                      # start a job of 200 records, and watch it
    python stream_client_jobs.py --job ID             # follow a job again (Ctrl-C stops watching)
    python stream_client_jobs.py --job ID --cancel    # cancel it
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url

# Step 4's reader of Server-Sent Events, as it is: see stream_client_sse.py.
from stream_client_sse import Event, SSEParser

SERVER = Server(11, "stream_server_jobs.py", refusals=(400, 404, 409, 429))  # in errors
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's heartbeat (a comment every 15 s).
READ_TIMEOUT = 70.0
RECONNECTS = 5  # attempts in a row before giving up


def bearer(url: str, user: str) -> dict:
    """A freshly minted token for each request: here they are free (step 3's demo minting)."""
    minted = requests.post(f"{url}/generate_token", json={"user_id": user}, timeout=10)
    if minted.status_code in (502, 503):  # a proxy whose server is away: follow() tries again
        minted.raise_for_status()
    SERVER.check_status(minted, "application/json")
    return {"Authorization": f"Bearer {minted.json()['access_token']}"}


def stream_chunks(base: str, job: str, user: str, parser: SSEParser) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    url, headers = f"{base}/jobs/{job}/events", {"Accept": "text/event-stream"}
    if parser.last_id:
        headers["Last-Event-ID"] = parser.last_id  # resume right after the last event seen
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    try:
        headers.update(bearer(base, user))
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code in (502, 503):  # a proxy without a server, or no Redis
                response.raise_for_status()
            SERVER.check_status(response, "text/event-stream")
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. decode_unicode uses the
            # charset the server named, and keeps a character split across chunks whole.
            yield from response.iter_content(chunk_size=None, decode_unicode=True)
    except requests.ConnectionError as error:
        if parser.retry_ms is not None:  # it was there: `retry:` comes first, even to a quiet room
            raise
        raise SERVER.cannot_connect(url, error) from None


def follow(base: str, job: str, user: str) -> Iterator[Event]:
    """Yield the job's events until `end`; when the stream breaks, resume after the last one."""
    parser, failures = SSEParser(), 0
    while True:
        try:
            for text in stream_chunks(base, job, user, parser):
                for event in parser.feed(text):
                    failures = 0  # only a connection that brings events counts as working
                    yield event
                    if event.type == "end":
                        return
            problem = "the server ended the stream"
        except requests.HTTPError:  # the 502 or 503 above
            problem = "the server is not there, or cannot reach Redis"
        except requests.RequestException:  # a drop, a timeout: the events so far are kept
            problem = "the connection was lost"
        failures += 1
        if failures > RECONNECTS:
            raise StreamError(f"{problem}, and {RECONNECTS} reconnections failed")
        wait = (parser.retry_ms or 2000) / 1000 * 2 ** (failures - 1)  # twice as long each time
        print(f"\r{'':60}\r({problem}; resuming after {parser.last_id or 'none'} in {wait:g}s)")
        time.sleep(wait)


def post(url: str, path: str, user: str, **body) -> dict:
    """POST to the server as `user`; the JSON object it answers."""
    try:
        headers, path = bearer(url, user), f"{url}{path}"
        posted = requests.post(path, json=body, headers=headers, timeout=10)
    except requests.ConnectionError as error:
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a timeout, or a proxy's 502 as above
        raise StreamError(f"{url} did not answer ({error})") from None
    SERVER.check_status(posted, "application/json")
    return posted.json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start a job, or follow one, and show progress.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="who you are (default: User1)")
    parser.add_argument("--count", type=int, default=200, help="records of a new job (200)")
    parser.add_argument("--job", metavar="ID", help="follow this job instead of starting one")
    parser.add_argument("--cancel", action="store_true", help="cancel the --job, and exit")
    args = parser.parse_args(argv)
    if args.cancel and not args.job:
        parser.error("--cancel needs the --job to cancel")
    try:
        url = base_url(args.url)
        if args.cancel:
            print(f"job {args.job}: {post(url, f'/jobs/{args.job}/cancel', args.user)['state']}")
            return 0
        job = args.job or post(url, "/jobs", args.user, count=args.count)["id"]
        print(f"job {job} (Ctrl-C stops watching; the job goes on)", file=sys.stderr)
        for event in follow(url, job, args.user):
            # Only printable characters from the server: a control character steers terminals.
            data = {k: "".join(c if c.isprintable() else "?" for c in str(v))
                    for k, v in json.loads(event.data).items()}
            if event.type == "end":
                print(f"\njob {job}: {data['state']}")
                return 0 if data["state"] == "done" else 1
            if "error" in data:  # a failed record: a line of its own, above the progress line
                print(f"\r{'':60}\rfailed: {data['error']}")
            done, total = int(data["done"]), int(data["total"])
            print(f"\r[{'#' * (30 * done // total):30}] {done}/{total} records", end="", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()  # off the progress line
        return 130  # Ctrl-C: stop quietly, the usual exit status for it


if __name__ == "__main__":
    sys.exit(main())
