"""Step 3 client: get a token, look inside it, and stream with it.

Start the server first (python stream_server_multiuser_secure.py), then:

    python stream_client_multiuser_secure.py                   # mints a token for User1
    python stream_client_multiuser_secure.py --user Alice --count 5
    python stream_client_multiuser_secure.py --token "$TOKEN"  # one minted with curl
    python stream_client_multiuser_secure.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import jwt
import requests
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

DEFAULT_URL = "http://127.0.0.1:5000"
STEP, SERVER = 3, "stream_server_multiuser_secure.py"  # named in the error messages
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
LAST_DATE = datetime(9999, 12, 31, tzinfo=timezone.utc)
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
    """Say why no answer came: no server, HTTP and HTTPS mixed up, or a certificate not trusted."""
    if "CERTIFICATE_VERIFY_FAILED" in str(error):  # HTTPS, from a CA this client does not know
        return StreamError(f"cannot verify the certificate of {url}: pass its CA with --cacert")
    if isinstance(error, requests.exceptions.SSLError):  # HTTPS, answered by something else
        return StreamError(f"{url} speaks plain HTTP (started without --cert?): use http://")
    if isinstance(error.args[0], ProtocolError):  # connected, then closed unanswered: HTTPS, say
        return StreamError(f"{url} speaks HTTPS (started with --cert?): use https:// with --cacert")
    return start_it(f"cannot connect to {url}: is the server running?")


def check_status(response: requests.Response, content_type: str) -> None:
    """Let this step's answer through; make anything else a StreamError that says what it is."""
    status, kind = response.status_code, response.headers.get("Content-Type", "")
    if response.ok and kind.startswith(content_type):
        return
    # This step's server refuses bad input with a 400 and a bad token with a 401 (a 5xx: it
    # failed, or a proxy did). Any other answer is another server's: a 404, another type.
    if status not in (400, 401) and status < 500:
        answer = f"{status} {kind}" if response.ok else status
        url = response.url.partition("?")[0]
        raise start_it(f"{url} answered {answer}: it is not step {STEP}'s server.")
    try:
        body = response.json()
        message = body.get("error_description") or body["error"]  # a 401 explains itself
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.reason
    raise StreamError(f"server answered {status}: {message}")


def mint_token(base: str, user: str, verify: str | bool) -> str:
    """Ask the server for a token, as the README's curl command does."""
    url = f"{base}/generate_token"
    try:
        response = requests.post(url, json={"user_id": user}, timeout=(3.05, 10), verify=verify)
    except requests.ConnectionError as error:
        raise cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None
    check_status(response, "application/json")
    return response.json()["access_token"]


def show_claims(token: str) -> None:
    """Print what the token carries, so the reader sees that a JWT is readable by anyone."""
    try:
        # Decoded WITHOUT checking the signature: a client has no key to check it
        # with, and anybody can write a token that claims anything. Only the server,
        # which verifies the signature, may trust these claims.
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.DecodeError as error:
        raise StreamError(f"that is not a JWT ({error})") from None
    print(f"token claims (not verified here): {json.dumps(claims)}")
    # A hand-made token may carry any number: past the year 9999 there is no date to print.
    if isinstance(claims.get("exp"), int) and 0 <= claims["exp"] < LAST_DATE.timestamp():
        expires = datetime.fromtimestamp(claims["exp"], timezone.utc)
        if expires > datetime.now(timezone.utc):
            print(f"token expires at {expires:%H:%M:%S} UTC")
        else:  # sent all the same: the server decides (it allows a few seconds of clock skew)
            print(f"token has expired (at {expires:%Y-%m-%d %H:%M:%S} UTC)")


def stream_chunks(
    url: str, token: str, count: int, interval: float, verify: str | bool
) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived (see step 1)."""
    params = {"count": count, "interval": interval}
    # The token goes in a header, never in the URL: URLs end up in logs and histories.
    headers = {"Authorization": f"Bearer {token}"}
    options = {"stream": True, "timeout": (3.05, READ_TIMEOUT), "verify": verify}
    connected = False
    try:
        with requests.get(url, params=params, headers=headers, **options) as r:
            connected = True
            check_status(r, "text/plain")
            yield from r.iter_content(chunk_size=None, decode_unicode=True)
    except requests.exceptions.ChunkedEncodingError:
        raise StreamError("the stream was cut off before its end") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise cannot_connect(url, error) from None
    except requests.RequestException as error:
        raise StreamError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream one user's data with a bearer token.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint a token for")
    parser.add_argument("--token", help="use this token instead of minting one")
    parser.add_argument("--count", type=int, default=10, help="chunks to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    if args.cacert and not os.path.isfile(args.cacert):
        parser.error(f"--cacert {args.cacert}: no such file")
    # Certificates are always checked: with --cacert, against that CA; without, against the
    # system's. Never verify=False: it accepts any certificate, so anyone on the path could
    # pose as the server and collect the token.
    verify = args.cacert or True

    try:
        base = base_url(args.url)
        token = args.token or mint_token(base, args.user, verify)
        show_claims(token)
        started = time.monotonic()
        chunks = size = 0
        for chunk in stream_chunks(f"{base}/stream", token, args.count, args.interval, verify):
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
