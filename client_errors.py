"""What every step's client says when something goes wrong, shared so that no step repeats it.

Not a step of its own: a client that meets no server, another step's server, a refusal or a
URL that is no server's prints one line saying so, never a traceback, and names the server to
start when that is the cure. Each client names its server once and asks it:

    SERVER = Server(1, "stream_server.py")             # step 1's server, named in its errors
    SERVER.check_status(response, "text/plain")         # lets the step's own answer through
    raise SERVER.cannot_connect(url, error) from None   # says why a connection failed

The plumbing around those errors is here too, so that a step's code shows its lesson: the
clients that take tokens (steps 3, 5, 6 and 7) POST for them with SERVER.post_json and read
--cacert with ca_certs; the chat client (step 8) posts with SERVER.post_retrying, which tries
again without ever storing a post twice. And every client prints text from the network through
visible(), so that a server, or another user of a chat, cannot steer the terminal with control
characters.
"""

import argparse
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from urllib3.exceptions import ProtocolError  # requests is built on urllib3

DEFAULT_URL = "http://127.0.0.1:5000"  # where every step's server listens unless told otherwise


def visible(text: object) -> str:
    """`text` made safe to print: each character that a terminal would act on rather than show
    (ESC, CR, BEL, a line break, a bidi override...) is written as its escape, such as \\x1b."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


class StreamError(Exception):
    """Something went wrong that the user should read as one line, not a traceback."""


def base_url(url: str) -> str:
    """--url without its trailing slash; a StreamError unless it is a server's base URL."""
    if re.fullmatch(r"https?://[^/?#\s]+/*", url):
        return url.rstrip("/")
    raise StreamError(f"--url takes the server's http(s) base URL such as {DEFAULT_URL}, not {url}")


def ca_certs(parser: argparse.ArgumentParser, cacert: str | None) -> str | bool:
    """requests' verify= for --cacert: that CA's file, or True for the system's CAs; never False,
    which accepts any certificate. A --cacert that is no file of certificates is a usage error."""
    if not cacert:
        return True
    try:  # loaded now: a key or a folder would only fail later, as a baffling TLS error
        ssl.create_default_context(cafile=cacert)
    except FileNotFoundError:
        parser.error(f"--cacert {cacert}: no such file")
    except OSError:  # ssl.SSLError is one
        parser.error(f"--cacert {cacert}: no certificate in it; pass the CA's (client.pem)")
    return cacert


@dataclass(frozen=True)
class Server:
    """The server a step's client needs: its errors name the step and the file to start."""

    step: int
    file: str
    # The statuses that server refuses a request with, saying why in its JSON: bad input gets
    # a 400 from every step's server; step 3's refuses a bad token with a 401 too, and step
    # 8's a user past one of its bounds with a 429.
    refusals: tuple[int, ...] = (400,)
    # Whether that server may speak HTTPS (started with --cert): then a client that speaks the
    # other scheme, or does not trust its certificate, is told so.
    https: bool = False

    def start_it(self, problem: str) -> StreamError:
        """A StreamError for a missing or wrong server, saying which one this step needs."""
        return StreamError(f"{problem} Start it with: python {self.file}")

    def cannot_connect(self, url: str, error: requests.ConnectionError) -> StreamError:
        """Say why no answer came: nothing listening, a server that speaks no plain HTTP, or (for
        a server that may speak HTTPS) the schemes mixed up or a certificate not trusted."""
        dropped = isinstance(error.args[0], ProtocolError)  # connected, then closed unanswered
        if self.https and "CERTIFICATE_VERIFY_FAILED" in str(error):  # from a CA not known here
            return StreamError(f"cannot verify the certificate of {url}: pass its CA with --cacert")
        if self.https and isinstance(error, requests.exceptions.SSLError):  # plain HTTP answered
            return StreamError(f"{url} speaks plain HTTP (started without --cert?): use http://")
        if self.https and dropped:  # what a server started with --cert does to plain HTTP
            return StreamError(
                f"{url} speaks HTTPS (started with --cert?): use https:// with --cacert"
            )
        if dropped:  # an HTTPS server, say: not this step's
            return self.start_it(f"{url} gave no HTTP answer: it is not step {self.step}'s server.")
        return self.start_it(f"cannot connect to {url}: is the server running?")

    def check_status(self, response: requests.Response, content_type: str) -> None:
        """Let this step's answer through; make anything else a StreamError that says what it is."""
        status, kind = response.status_code, response.headers.get("Content-Type", "")
        if response.ok and kind.startswith(content_type):
            return
        url = response.url.partition("?")[0]
        raise self.refusal(url, status, kind, response.json, response.reason)

    def post_json(
        self, url: str, body: dict, verify: str | bool, unavailable: type[StreamError] | None = None
    ) -> dict:
        """POST `body` as JSON for tokens; the JSON object answered, with its access_token, or a
        StreamError saying what went wrong. A 503 raises `unavailable` instead, if given, for a
        step that tries again later."""
        try:
            response = requests.post(url, json=body, timeout=(3.05, 10), verify=verify)
        except requests.ConnectionError as error:
            raise self.cannot_connect(url, error) from None
        except requests.RequestException as error:  # a malformed URL, for one
            raise StreamError(str(error)) from None
        if unavailable and response.status_code == 503:
            raise unavailable(f"{url} answered 503")
        self.check_status(response, "application/json")
        try:
            answer = response.json()
        except ValueError:  # said to be JSON, and is not
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
            return answer
        raise self.start_it(f"{url} sent no token: it is not step {self.step}'s server.")

    def refusal(
        self, url: str, status: int, kind: str, read_json: Callable[[], Any], reason: str
    ) -> StreamError:
        """A StreamError for an HTTP answer other than the one asked for (check_status's, or a
        WebSocket handshake's): read_json() reads its body, if this step's server sent it."""
        # This step's server explains its refusals (a 5xx: it failed, or a proxy did). Any
        # other answer is another server's, often another step's: a 404, a 401, another type.
        if status not in self.refusals and status < 500:
            answer = visible(f"{status} {kind}" if status < 400 else status)
            return self.start_it(f"{url} answered {answer}: it is not step {self.step}'s server.")
        try:
            body = read_json()
            message = body.get("error_description") or body["error"]  # a 401 explains itself
            if isinstance(message, dict):  # OpenAI's shape (step 9): {"error": {"message"...}}
                message = message["message"]
        except (ValueError, KeyError, TypeError, AttributeError):
            message = reason
        return StreamError(f"server answered {status}: {visible(message)}")

    def post_retrying(
        self, url: str, body: dict, headers: dict, pauses: tuple[float, ...] = (1, 2)
    ) -> requests.Response:
        """POST `body` as JSON with an Idempotency-Key, and after a 503 or a lost answer (a drop,
        a timeout) try again with the same key, waiting `pauses` seconds: a server that
        honours the key stores the post once however many tries reach it. The first other
        answer, for check_status; or a StreamError that says the post may or may not be stored,
        because a try that got no answer may have been stored."""
        headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}  # one key, every try
        for pause in (0, *pauses):  # no pause before the first try
            if pause:
                time.sleep(pause)
            try:
                response = requests.post(url, json=body, headers=headers, timeout=(3.05, 10))
                if response.status_code != 503:
                    return response
                problem = f"{url} answered 503"
            except requests.RequestException as error:
                problem = f"{url} gave no answer ({error})"
        tries = len(pauses) + 1
        raise StreamError(f"{problem}, {tries} times: it may or may not have been stored")
