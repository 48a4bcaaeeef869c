"""Step 7 client: one long stream across many short-lived access tokens, with no gap.

Whenever the stream stops early, the client resumes from the next line it has not
seen: at once with a new pair of tokens when its access token has expired; after a
pause that doubles each time (1, 2, 4, 8, 16 s) when the connection dropped or the
server is restarting, and gives up after five such tries in a row.

Start the server first (python stream_server_multiuser_resume.py --access-lifetime 5), then:

    python stream_client_multiuser_resume.py --count 14 --interval 1
    python stream_client_multiuser_resume.py --url https://localhost:5000 --cacert certs/client.pem
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import jwt
import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, ca_certs, visible

# Named in the error messages. It refuses a bad token with a 401 that says why, as it refuses
# bad input with a 400; and it may speak HTTPS, so the client says when the schemes differ.
SERVER = Server(7, "stream_server_multiuser_resume.py", refusals=(400, 401), https=True)
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
LAST_DATE = datetime(9999, 12, 31, tzinfo=timezone.utc)
RETRIES = 5  # resumes in a row that bring no new line before giving up
FIRST_WAIT = 1.0  # seconds before the first retry; each next one waits twice as long


class Interrupted(StreamError):
    """The stream stopped, or the server did not answer: worth a retry after a pause."""


class Expired(Exception):
    """The access token expired: refresh it and resume at once."""


def stream_chunks(
    url: str, token: str, params: dict, verify: str | bool
) -> Iterator[dict]:
    """Yield the stream's lines as JSON objects; Expired or Interrupted if it stops early."""
    # The token goes in a header, never in the URL: URLs end up in logs and histories.
    headers = {"Authorization": f"Bearer {token}"}
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    connected = False
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.get(
            url, params=params, headers=headers, stream=True, timeout=timeout, verify=verify
        ) as response:
            connected = True
            if response.status_code == 401 and "expired" in response.text:  # by its clock
                raise Expired("the server refused the expired access token")
            SERVER.check_status(response, "application/x-ndjson")
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. decode_unicode uses the
            # charset the server named, and keeps a character split across chunks whole.
            # Here a line of JSON is of use only whole, and iter_lines would also hand over
            # a last line cut off by the end of the body: we split the lines ourselves.
            pending = b""
            for chunk in response.iter_content(chunk_size=None):
                *lines, pending = (pending + chunk).split(b"\n")
                yield from map(json.loads, lines)
            if pending:  # no newline at its end: the stream stopped in the middle of it
                raise Interrupted("the stream stopped in the middle of a line")
    except requests.exceptions.ChunkedEncodingError:
        raise Interrupted("the connection was lost") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise Interrupted(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise Interrupted("the server does not answer") from None  # it may be restarting
    except json.JSONDecodeError:
        raise StreamError(f"{url} sent a line that is not JSON") from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def get_tokens(url: str, body: dict, verify: str | bool) -> dict:
    """POST for a pair of tokens: at /generate_token to log in, at /refresh_token to renew."""
    # A 503 (such as while the server cannot reach Redis) is Interrupted: worth a retry.
    tokens = SERVER.post_json(url, body, verify, unavailable=Interrupted)
    # Step 3's server, for one, mints an access token alone: there is nothing to renew it with.
    lasts = tokens.get("expires_in")
    if not isinstance(tokens.get("refresh_token"), str) or not isinstance(lasts, int):
        raise SERVER.start_it(f"{url} sent no pair of tokens: it is not step 7's server.")
    # When to renew, by this computer's clock: the exp inside the token is by the server's,
    # and the two may disagree. expires_in says how long the token lasts from now.
    tokens["renew_at"] = time.monotonic() + lasts
    return tokens


def renew(base: str, tokens: dict, verify: str | bool) -> dict:
    """The same pair while its access token lasts; then a new one, bought with its refresh token."""
    if time.monotonic() < tokens["renew_at"]:
        return tokens
    print("(the access token expired: refreshing the token)", flush=True)
    # The refresh token works once: from now on, only the new pair's one renews the login.
    return get_tokens(f"{base}/refresh_token", {"refresh_token": tokens["refresh_token"]}, verify)


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


def follow(base: str, tokens: dict, params: dict, verify: str | bool) -> Iterator[dict]:
    """Yield every line of the stream once, refreshing tokens and resuming whenever it stops."""
    next_line, failures, expired_at = 1, 0, 0
    # Once every line is here, a connection lost before the end line needs no resume.
    while next_line <= params["count"]:
        try:
            token = (tokens := renew(base, tokens, verify))["access_token"]
            for message in stream_chunks(
                f"{base}/stream", token, {**params, "from": next_line}, verify
            ):
                if message.get("end") == "complete":
                    return
                if message.get("end") == "token_expired":
                    raise Expired("the access token expired")
                next_line, failures = message["seq"] + 1, 0
                yield message
            raise Interrupted("the stream ended without its last line")
        except Expired as why:
            if expired_at == next_line:  # a new token, expired at once: refreshing again would loop
                raise StreamError(f"{why} even right after a refresh") from None
            expired_at, tokens["renew_at"] = next_line, 0  # renew now, whatever our clock says
        except Interrupted as why:
            failures += 1
            if failures > RETRIES:
                raise StreamError(f"{why}, and {RETRIES} tries in a row brought nothing") from None
            # Doubling pauses: a restarting server gets time to come back, and many
            # clients that lost it at once do not all knock again at the same moment.
            wait = FIRST_WAIT * 2 ** (failures - 1)
            print(f"({why}: resuming from line {next_line} in {wait:g}s)", flush=True)
            time.sleep(wait)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Follow a long stream across token refreshes.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint a token for")
    parser.add_argument("--count", type=int, default=200, help="lines to ask for")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    # Never verify=False: it accepts any certificate, so anyone posing as the server gets the token.
    verify = ca_certs(parser, args.cacert)  # always checked: against --cacert's CA, or the system's

    try:
        base = base_url(args.url)
        tokens = get_tokens(f"{base}/generate_token", {"user_id": args.user}, verify)
        show_claims(tokens["access_token"])
        started = time.monotonic()
        params = {"count": args.count, "interval": args.interval}
        for message in follow(base, tokens, params, verify):
            print(f"+{time.monotonic() - started:.2f}s  {visible(message['text'])}", flush=True)
    except StreamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # Ctrl-C: stop quietly, the usual exit status for it
    print(f"done: all {args.count} lines in {time.monotonic() - started:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
