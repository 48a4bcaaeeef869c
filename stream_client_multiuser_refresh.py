"""Step 6 client: log in once, then stream again and again, renewing the access token.

Start the server first (python stream_server_multiuser_refresh.py --access-lifetime 5), then:

    python stream_client_multiuser_refresh.py                  # logs in as User1, streams once
    python stream_client_multiuser_refresh.py --streams 3 --count 4 --interval 1
    python stream_client_multiuser_refresh.py --url https://localhost:5000 --cacert certs/client.pem
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
SERVER = Server(6, "stream_server_multiuser_refresh.py", refusals=(400, 401), https=True)
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream, so it must be longer than the server's longest interval (60 s).
READ_TIMEOUT = 70.0
LAST_DATE = datetime(9999, 12, 31, tzinfo=timezone.utc)


def stream_chunks(
    url: str, token: str, count: int, interval: float, verify: str | bool
) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    params = {"count": count, "interval": interval}
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


def get_tokens(url: str, body: dict, verify: str | bool) -> dict:
    """POST for a pair of tokens: at /generate_token to log in, at /refresh_token to renew."""
    tokens = SERVER.post_json(url, body, verify)
    # Step 3's server, for one, mints an access token alone: there is nothing to renew it with.
    lasts = tokens.get("expires_in")
    if not isinstance(tokens.get("refresh_token"), str) or not isinstance(lasts, int):
        raise SERVER.start_it(f"{url} sent no pair of tokens: it is not step 6's server.")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream one user's data again and again.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint a token for")
    parser.add_argument("--streams", type=int, default=1, help="streams to open, one by one")
    parser.add_argument("--count", type=int, default=10, help="chunks to ask for")
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
        chunks = size = 0
        for _ in range(args.streams):  # as a client that keeps coming back for more would
            token = (tokens := renew(base, tokens, verify))["access_token"]
            for chunk in stream_chunks(f"{base}/stream", token, args.count, args.interval, verify):
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
