"""Step 6 client: one long stream across many short-lived access tokens, with no gap.

Whenever the stream stops early (the access token expired, the connection
dropped, or the server refused an expired token), the client trades its refresh
token for a new pair and resumes from the next line it has not seen.

Start the server first (python stream_server_multiuser_refresh.py), then:

    python stream_client_multiuser_refresh.py --count 200 --interval 0.5
    python stream_client_multiuser_refresh.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

import requests

DEFAULT_URL = "http://127.0.0.1:5000"
READ_TIMEOUT = 70.0  # longer than the server's longest interval (60 s)
RETRIES = 5  # resumes in a row that bring no new line before giving up


class StreamError(Exception):
    """Something went wrong that the user should read as one line, not a traceback."""


class Interrupted(Exception):
    """The stream stopped before its end; the client can refresh and resume."""


def server_message(response: requests.Response) -> str:
    try:
        body = response.json()
        return body.get("error_description") or body["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.reason


def post(url: str, payload: dict, verify: str | bool) -> dict:
    """POST JSON for tokens; a refusal becomes a StreamError with the server's reason."""
    try:
        response = requests.post(url, json=payload, timeout=(3.05, 10), verify=verify)
    except requests.exceptions.SSLError:
        raise StreamError(
            f"cannot verify the certificate of {url}: pass its CA with --cacert"
        ) from None
    except requests.RequestException:
        raise StreamError(
            f"cannot connect to {url}: is the server running? "
            "Start it with: python stream_server_multiuser_refresh.py"
        ) from None
    if not response.ok:
        raise StreamError(f"{url} answered {response.status_code}: {server_message(response)}")
    return response.json()


def stream_lines(url: str, access_token: str, params: dict, verify: str | bool) -> Iterator[dict]:
    """The messages of one connection; Interrupted if it stops early in a way worth a resume."""
    headers = {"Authorization": f"Bearer {access_token}"}
    options = {"stream": True, "timeout": (3.05, READ_TIMEOUT), "verify": verify}
    try:
        with requests.get(url, params=params, headers=headers, **options) as response:
            if response.status_code == 401 and "expired" in server_message(response):
                raise Interrupted("the server refused the expired access token")
            if not response.ok:
                raise StreamError(
                    f"server answered {response.status_code}: {server_message(response)}"
                )
            # One JSON object per line: here waiting for each line's end is what we want.
            for text in response.iter_lines():
                yield json.loads(text)
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError):
        raise Interrupted("the connection was lost") from None
    except ValueError:
        raise StreamError(
            f"{url} sent a line that is not JSON: is it this step's server?"
        ) from None


def follow(base_url: str, user: str, params: dict, verify: str | bool) -> Iterator[dict]:
    """Yield every line of the stream once, refreshing tokens and resuming whenever it stops."""
    tokens = post(f"{base_url}/generate_token", {"user_id": user}, verify)
    next_line, retries = 1, 0
    while True:
        try:
            for message in stream_lines(
                f"{base_url}/stream", tokens["access_token"], {**params, "from": next_line}, verify
            ):
                if message.get("end") == "complete":
                    return
                if message.get("end") == "token_expired":
                    raise Interrupted("the access token expired")
                next_line, retries = message["seq"] + 1, 0
                yield message
            raise Interrupted("the stream ended without its last line")
        except Interrupted as why:
            retries += 1
            if retries > RETRIES:
                raise StreamError(
                    f"{why}, and {RETRIES} resumes in a row brought nothing"
                ) from None
            print(f"({why}: refreshing the token, resuming from line {next_line})", flush=True)
            refresh = {"refresh_token": tokens["refresh_token"]}
            tokens = post(f"{base_url}/refresh_token", refresh, verify)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Follow a long stream across token refreshes.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint tokens for")
    parser.add_argument("--count", type=int, default=200, help="lines to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between lines")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    if args.cacert and not os.path.isfile(args.cacert):
        parser.error(f"--cacert {args.cacert}: no such file")
    verify = args.cacert or True  # never False: see step 3's client

    started = time.monotonic()
    try:
        for message in follow(
            args.url, args.user, {"count": args.count, "interval": args.interval}, verify
        ):
            print(f"+{time.monotonic() - started:.2f}s  {message['text']}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"done: all {args.count} lines in {time.monotonic() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
