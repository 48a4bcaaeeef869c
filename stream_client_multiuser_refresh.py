"""Step 6 client: one long stream across many short-lived access tokens, with no gap.

Whenever the stream stops early, the client resumes from the next line it has not
seen: at once with a new pair of tokens when its access token has expired; after a
pause that doubles each time (1, 2, 4, 8, 16 s) when the connection dropped or the
server is restarting, and gives up after five such tries in a row.

Start the server first (python stream_server_multiuser_refresh.py), then:

    python stream_client_multiuser_refresh.py --count 200 --interval 0.5
    python stream_client_multiuser_refresh.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import StreamError

DEFAULT_URL = "http://127.0.0.1:5000"
READ_TIMEOUT = 70.0  # longer than the server's longest interval (60 s)
RETRIES = 5  # resumes in a row that bring no new line before giving up
FIRST_WAIT = 1.0  # seconds before the first retry; each next one waits twice as long
START_SERVER = "python stream_server_multiuser_refresh.py"


class Interrupted(Exception):
    """The stream stopped, or the server did not answer: worth a retry after a pause."""


class Expired(Exception):
    """The access token expired: refresh it and resume at once."""


def server_message(response: requests.Response) -> str:
    try:
        body = response.json()
        return body.get("error_description") or body["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.reason


def not_step_6(base_url: str, what: str) -> StreamError:
    """Another program answers at base_url, such as another step's server."""
    return StreamError(f"{base_url} is not step 6's server ({what}): start it with {START_SERVER}")


def speaks_tls(base_url: str, verify: str | bool) -> bool:
    """Whether the host and port of an http:// URL answer a TLS handshake. A server started
    with --cert drops a plain-HTTP request unanswered, which looks like a server that is down."""
    parts = urlsplit(base_url)
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    try:
        with (
            socket.create_connection((parts.hostname, parts.port or 80), timeout=3.05) as sock,
            context.wrap_socket(sock, server_hostname=parts.hostname),
        ):
            return True
    except ssl.SSLCertVerificationError:
        return True  # it sent a certificate, one we do not trust: TLS all the same
    except OSError:  # refused, or not TLS (ssl.SSLError is an OSError too)
        return False


def cannot_connect(base_url: str, verify: str | bool) -> StreamError:
    if base_url.startswith("http://") and speaks_tls(base_url, verify):
        https = base_url.replace("http://", "https://", 1)
        return StreamError(
            f"{base_url} serves HTTPS only (its server was started with --cert): "
            f"use --url {https}, with --cacert if a local CA signed its certificate"
        )
    return StreamError(
        f"cannot connect to {base_url}/generate_token: is the server running? "
        f"Start it with: {START_SERVER}"
    )


def post(base_url: str, path: str, payload: dict, verify: str | bool) -> dict:
    """POST JSON for a pair of tokens; a refusal becomes a StreamError with the server's reason,
    no answer (or a 503, such as while the server cannot reach Redis) an Interrupted."""
    url = f"{base_url}{path}"
    try:
        response = requests.post(url, json=payload, timeout=(3.05, 10), verify=verify)
    except requests.exceptions.SSLError:
        raise StreamError(
            f"cannot verify the certificate of {url}: pass its CA with --cacert"
        ) from None
    except (requests.ConnectionError, requests.Timeout):
        raise Interrupted("the server does not answer") from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None
    if response.status_code == 503:
        raise Interrupted(f"{path} answered 503: {server_message(response)}")
    if response.status_code in (404, 405):
        raise not_step_6(base_url, f"POST {path} answered {response.status_code}")
    if not response.ok:
        raise StreamError(f"{url} answered {response.status_code}: {server_message(response)}")
    try:
        tokens = response.json()
        if all(isinstance(tokens[name], str) for name in ("access_token", "refresh_token")):
            return tokens
    except (ValueError, KeyError, TypeError):
        pass
    raise not_step_6(base_url, f"POST {path} gave no access and refresh token")


def stream_lines(
    base_url: str, access_token: str, params: dict, verify: str | bool
) -> Iterator[dict]:
    """The messages of one connection; Expired or Interrupted if it stops early."""
    headers = {"Authorization": f"Bearer {access_token}"}
    options = {"stream": True, "timeout": (3.05, READ_TIMEOUT), "verify": verify}
    connected = False
    try:
        with requests.get(f"{base_url}/stream", params, headers=headers, **options) as response:
            connected = True
            if response.status_code == 401 and "expired" in server_message(response):
                raise Expired("the server refused the expired access token")
            if response.status_code == 404:
                raise not_step_6(base_url, "GET /stream answered 404")
            if not response.ok:
                raise StreamError(
                    f"server answered {response.status_code}: {server_message(response)}"
                )
            content_type = response.headers.get("Content-Type", "").partition(";")[0]
            if content_type != "application/x-ndjson":
                raise not_step_6(base_url, f"GET /stream sent {content_type or 'no content type'}")
            # One JSON object per line: here waiting for each line's end is what we want.
            for text in response.iter_lines():
                yield json.loads(text)
    except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError, requests.Timeout):
        raise Interrupted(
            "the connection was lost" if connected else "the server does not answer"
        ) from None
    except ValueError:
        raise not_step_6(base_url, "GET /stream sent a line that is not JSON") from None


def follow(base_url: str, user: str, params: dict, verify: str | bool) -> Iterator[dict]:
    """Yield every line of the stream once, refreshing tokens and resuming whenever it stops."""
    try:
        tokens = post(base_url, "/generate_token", {"user_id": user}, verify)
    except Interrupted:
        raise cannot_connect(base_url, verify) from None
    next_line, failures, expired, refreshed = 1, 0, False, False
    # Once every line is here, a connection lost before the end line needs no resume.
    while next_line <= params["count"]:
        try:
            if expired:
                refresh = {"refresh_token": tokens["refresh_token"]}
                tokens = post(base_url, "/refresh_token", refresh, verify)
                expired, refreshed = False, True
            for message in stream_lines(
                base_url, tokens["access_token"], {**params, "from": next_line}, verify
            ):
                if message.get("end") == "complete":
                    return
                if message.get("end") == "token_expired":
                    raise Expired("the access token expired")
                next_line, failures, refreshed = message["seq"] + 1, 0, False
                yield message
            raise Interrupted("the stream ended without its last line")
        except Expired as why:
            if refreshed:  # a new token, expired at once: refreshing again would loop
                raise StreamError(f"{why} even right after a refresh") from None
            expired = True
            print(f"({why}: refreshing the token, resuming from line {next_line})", flush=True)
        except Interrupted as why:
            failures, refreshed = failures + 1, False
            if failures > RETRIES:
                raise StreamError(f"{why}, and {RETRIES} tries in a row brought nothing") from None
            # Doubling pauses: a restarting server gets time to come back, and many
            # clients that lost it at once do not all knock again at the same moment.
            wait = FIRST_WAIT * 2 ** (failures - 1)
            print(f"({why}: resuming from line {next_line} in {wait:g}s)", flush=True)
            time.sleep(wait)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Follow a long stream across token refreshes.")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the server's base URL (default: {DEFAULT_URL})"
    )
    parser.add_argument("--user", default="User1", help="user to mint tokens for")
    parser.add_argument("--count", type=int, default=200, help="lines to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between lines")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or url.path.strip("/") or url.query:
        parser.error(f"--url {args.url}: give the server's base URL, such as {DEFAULT_URL}")
    if args.cacert and not os.path.isfile(args.cacert):
        parser.error(f"--cacert {args.cacert}: no such file")
    verify = args.cacert or True  # never False: see step 3's client

    base_url, params = args.url.rstrip("/"), {"count": args.count, "interval": args.interval}
    started = time.monotonic()
    try:
        for message in follow(base_url, args.user, params, verify):
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
