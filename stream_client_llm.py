"""Step 9 client: ask for an answer and print it token by token, as a chat assistant shows it.

Start the server first (python stream_server_llm.py), then:

    python stream_client_llm.py "Why stream an answer?"       # mints a token for User1
    echo "Why stream an answer?" | python stream_client_llm.py  # the prompt from stdin
    python stream_client_llm.py --max-tokens 12 "Say a little"
    python stream_client_llm.py --url https://localhost:5000 --cacert certs/client.pem "Hi"

Ctrl-C stops the answer, and the server stops generating it.
"""

import argparse
import codecs
import json
import re
import sys
import time
from collections.abc import Iterator

import requests

# One line for each thing that can go wrong, never a traceback, shared: see client_errors.py.
from client_errors import DEFAULT_URL, Server, StreamError, base_url, ca_certs

# Step 4's parser of Server-Sent Events, imported as the chat client does.
from stream_client_sse import SSEParser

# Named in the error messages. It refuses a bad token with a 401 that says why, as it refuses
# bad input with a 400; and it may speak HTTPS, so the client says when the schemes differ.
SERVER = Server(9, "stream_server_llm.py", refusals=(400, 401, 404, 413, 415, 429), https=True)
# The read timeout is the longest silence allowed between two chunks, not a limit
# on the whole stream: the server sends a comment every 15 s while its model thinks.
READ_TIMEOUT = 70.0
MODEL = "stand-in-1"
# The answer is text from the network: ESC and the other control characters would let it
# steer the terminal (move the cursor, rewrite what is shown), so they are printed escaped.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def stream_chunks(url: str, token: str, body: dict, verify: str | bool) -> Iterator[str]:
    """Yield the stream's chunks as text, each as soon as it has arrived."""
    # The token goes in a header, never in the URL: URLs end up in logs and histories.
    headers = {"Authorization": f"Bearer {token}"}
    timeout = (3.05, READ_TIMEOUT)  # (connect, read) in seconds
    connected = False
    try:
        # stream=True: return once the headers are in, leaving the body unread.
        with requests.post(
            url, json=body, headers=headers, stream=True, timeout=timeout, verify=verify
        ) as response:
            connected = True
            SERVER.check_status(response, "text/event-stream")
            # chunk_size=None hands over each HTTP chunk whole, the moment it arrives.
            # A number would cut chunks into pieces of that size (and, on a body that
            # is not chunked, wait until that many bytes have come); iter_lines holds
            # text back until a newline arrives, so a chunk without one (a word of
            # generated text, say) would wait for the next line. Event streams are always
            # UTF-8 (whatever charset requests would guess), and the decoder keeps a
            # character split across two chunks whole.
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for piece in response.iter_content(chunk_size=None):
                yield decoder.decode(piece)
    except requests.exceptions.ChunkedEncodingError:
        raise StreamError("the stream was cut off before its end") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        if connected or isinstance(error, requests.ReadTimeout):
            raise StreamError(f"the server sent nothing for {READ_TIMEOUT:g}s") from None
        raise SERVER.cannot_connect(url, error) from None
    except requests.RequestException as error:  # a malformed URL, for one
        raise StreamError(str(error)) from None


def answer_tokens(url: str, token: str, body: dict, verify: str | bool) -> Iterator[str]:
    """Yield each token of the answer the moment it arrives, until `data: [DONE]`."""
    parser = SSEParser()
    for text in stream_chunks(url, token, body, verify):
        for event in parser.feed(text):
            if event.data == "[DONE]":  # the last event: the answer is whole
                return
            try:
                chunk = json.loads(event.data)
                if "error" in chunk:  # the server failed once the stream had begun
                    raise StreamError(f"the answer failed: {chunk['error']['message']}")
                texts = [choice["delta"].get("content") for choice in chunk["choices"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise SERVER.start_it("an event is no chat.completion.chunk:") from None
            yield from (text for text in texts if text)
    raise StreamError("the stream ended before data: [DONE]: the answer is cut short")


def mint_token(base: str, user: str, verify: str | bool) -> str:
    """Ask the server for a token, as the README's curl command does."""
    return SERVER.post_json(f"{base}/generate_token", {"user_id": user}, verify)["access_token"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask for an answer and print it as it comes.")
    parser.add_argument("prompt", nargs="?", help="what to ask (default: read stdin)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default: {DEFAULT_URL})")
    parser.add_argument("--user", default="User1", help="user to mint a token for")
    parser.add_argument("--token", help="use this token instead of minting one")
    parser.add_argument("--max-tokens", type=int, help="stop the answer after this many")
    parser.add_argument("--cacert", help="trust certificates signed by this CA (PEM file)")
    args = parser.parse_args(argv)
    # Never verify=False: it accepts any certificate, so anyone posing as the server gets the token.
    verify = ca_certs(parser, args.cacert)  # always checked: against --cacert's CA, or the system's
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        parser.error("give a prompt, as an argument or on stdin")
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    body["stream_options"] = {"include_usage": True}  # a last chunk with the token counts
    if args.max_tokens is not None:
        body["max_completion_tokens"] = args.max_tokens

    started, first, tokens = time.monotonic(), None, 0
    try:
        base = base_url(args.url)
        token = args.token or mint_token(base, args.user, verify)
        url = f"{base}/v1/chat/completions"
        for text in answer_tokens(url, token, body, verify):
            first = first or time.monotonic()
            tokens += 1
            print(CONTROL.sub(lambda c: repr(c[0])[1:-1], text), end="", flush=True)
    except StreamError as error:
        print(f"\nerror: {error}" if tokens else f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # leaving the with block above hangs up: the server stops too
        print(f"\n(stopped after {tokens} token{'s' * (tokens != 1)})")
        return 130  # Ctrl-C: the usual exit status for it
    elapsed = time.monotonic() - (first or started)
    rate = f"{(tokens - 1) / elapsed:.1f} tokens/s" if tokens > 1 and elapsed else "-"
    print(f"\n\nfirst token after {(first or started) - started:.2f}s, {tokens} tokens, {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
