"""Step 9's plumbing: OpenAI's Chat Completions shapes, a stand-in model, a hang-up check.

Not a step of its own: stream_server_llm.py imports what it needs from here, so that its
code shows the lesson (a POST that starts a stream of events, generation that stops when
nobody reads, a relay) and not the details of a JSON format:

    import completions
    ask = completions.read_request(completions.json_body())     # or 400, 404, 415 in its shape
    yield completions.chunk(name, ask, {"content": token})        # one event of the stream

- read_request() checks a request body as OpenAI does and answers 400 or 404 in its shape;
- chunk() and completion() write the objects that OpenAI's clients read;
- APIError is an error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
  which the official client turns into its typed errors (AuthenticationError...);
- StandInModel is NOT a language model: it picks sentences from a fixed list, the same for
  the same prompt, and takes the time a model would, so that the streaming around it is real;
- Hangup tells whether a client has closed its connection, without reading from it.
"""

import _socket
import codecs
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import requests
from flask import Response, request
from werkzeug.exceptions import HTTPException

from stream_client_sse import SSEParser  # step 4's, to read an upstream's events
from tokens import Unauthenticated, ask_for_a_token

MODEL = "stand-in-1"  # the one model this server serves, by the name clients ask for
MODEL_CARD = {"id": MODEL, "object": "model", "created": 0, "owned_by": "stream-tutorial"}
MAX_TOKENS = 4096  # the most tokens one answer may have, whatever a client asks
MAX_MESSAGES = 256
# Seconds of silence from an upstream: before its headers a 504, then an error event.
UPSTREAM_TIMEOUT = 60.0
ROLES = {"system", "developer", "user", "assistant", "tool"}
# The stand-in's sentences: real-looking words and punctuation, some beyond ASCII, so that
# a client that splits a character across two reads shows up as mojibake.
SENTENCES = [
    "Streaming sends each token the moment it exists, so the reader sees the answer grow.",
    "A café in Zürich serves crème brûlée — naïvely, one spoonful at a time.",
    "The first token matters most: until it arrives, the page looks broken.",
    "Nothing is buffered on the way; every chunk is flushed as soon as it is written.",
    "Ça marche: the server stops generating when its reader leaves, and saves the cost.",
    "Tokens are small pieces of text, often a word, sometimes a comma or a “quote”.",
    "Straße, smörgåsbord and jalapeño are words too, and UTF-8 carries them all.",
    "A gateway relays another server's stream without holding it back…",
]
TOKEN = re.compile(r"\s*[\w'\u2019-]+|\s*[^\w\s]")  # a word with the space before it, or a sign


class APIError(HTTPException):
    """An error answered in OpenAI's shape, with the status its official client maps:
    400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError,
    5xx InternalServerError. The server's HTTPException handler writes it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, **headers: str) -> None:
        super().__init__(message)
        self.code, self.extra_headers = status, headers
        self.body = {"message": message, "type": kind, "param": param, "code": code}

    def get_headers(self, environ=None, scope=None) -> list[tuple[str, str]]:
        return [*super().get_headers(environ, scope), *self.extra_headers.items()]


def error_body(error: HTTPException) -> dict:
    """OpenAI's `{"error": {"message", "type", "param", "code"}}` for any HTTP error."""
    if isinstance(error, APIError):
        return {"error": error.body}
    kind = "server_error" if (error.code or 500) >= 500 else "invalid_request_error"
    return {"error": {"message": error.description, "type": kind, "param": None, "code": None}}


def json_body() -> dict:
    """The request body as a JSON object, or 415 or 400 in OpenAI's shape."""
    if not request.is_json:
        raise APIError(415, "send the body as JSON, with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)  # None if it does not parse
    except RecursionError:  # "[" nested a thousand deep: json gives up with this, not ValueError
        body = None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object, as OpenAI's API reference shows")
    return body


def open_upstream(url: str, ask: "CompletionRequest") -> requests.Response:
    """Ask an OpenAI-compatible server at `url` for the answer, streamed, and return its
    response once its headers are in; 502 (down, failing) or 504 (silent) in OpenAI's shape
    if not. The key comes from UPSTREAM_API_KEY and goes to the upstream only."""
    body = {"model": ask.model, "messages": ask.messages, "stream": True}
    if ask.max_tokens:  # the older name: llama.cpp, vLLM and Ollama all know it
        body["max_tokens"] = ask.max_tokens
    response = to_upstream("POST", f"{url}/v1/chat/completions", json=body, stream=True)
    if response.ok and response.headers.get("Content-Type", "").startswith("text/event-stream"):
        return response
    with response:
        try:
            error = response.json()["error"]
            message = str(error["message"])
        except (ValueError, KeyError, TypeError):
            error, message = {}, f"it answered {response.status_code}"
    # The client's own mistakes (a bad body, an unknown model, too many at once) are its to
    # fix: passed on. Anything else, a refused key included, is the gateway's: a 502.
    if response.status_code in (400, 404, 413, 429):
        raise APIError(response.status_code, message, param=error.get("param"),
                       code=error.get("code"))
    # A refused key is the gateway's UPSTREAM_API_KEY: the upstream's own words ("send your API
    # key") would send this client after a key it has sent.
    if response.status_code in (401, 403):
        key = "is not set" if not os.environ.get("UPSTREAM_API_KEY") else "was refused"
        raise APIError(502, f"the upstream model server refused this gateway: its "
                       f"UPSTREAM_API_KEY {key}", "server_error", code="upstream_refused")
    raise APIError(502, f"the upstream model server failed: {message}", "server_error")


def base_url(url: str) -> str:
    """--upstream's base URL, without a trailing / or /v1 (the paths add it); a ValueError
    unless it is an http(s) URL."""
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", url):
        raise ValueError(f"--upstream takes a server's http(s) base URL, not {url!r}")
    return url.rstrip("/").removesuffix("/v1")


def to_upstream(method: str, url: str, **options) -> requests.Response:
    """A request to the upstream with its key, UPSTREAM_API_KEY (none if unset: Ollama and a
    local llama.cpp take none); a 504 if it stays silent, a 502 if it cannot be reached."""
    key = os.environ.get("UPSTREAM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return requests.request(method, url, headers=headers, timeout=(3.05, UPSTREAM_TIMEOUT),
                                **options)
    except requests.Timeout:
        raise APIError(504, "the upstream model server did not answer in time",
                       "server_error", code="upstream_timeout") from None
    except requests.RequestException:
        raise APIError(502, "the upstream model server cannot be reached",
                       "server_error", code="upstream_unreachable") from None


def model_list(upstream: str | None) -> dict:
    """OpenAI's list of models: the stand-in, or for a gateway the upstream's own list."""
    if not upstream:
        return {"object": "list", "data": [MODEL_CARD]}
    with to_upstream("GET", f"{upstream}/v1/models") as response:
        try:
            if response.ok and isinstance(response.json().get("data"), list):
                return response.json()
        except (ValueError, AttributeError):
            pass
    raise APIError(502, f"the upstream model server answered {response.status_code} for its "
                   "models", "server_error")


def upstream_tokens(pieces: Iterator[bytes]) -> Iterator[str | None]:
    """The tokens of an upstream's stream, read with step 4's SSEParser as the pieces come,
    and None for a piece that brought none (a keep-alive comment, say); an APIError (502) if
    the stream fails, is cut off or falls silent, or ends before [DONE]."""
    parser, decoder = SSEParser(), codecs.getincrementaldecoder("utf-8")()
    try:
        for piece in pieces:
            texts = []
            for event in parser.feed(decoder.decode(piece)):
                if event.data == "[DONE]":
                    yield from texts
                    return
                texts += tokens_of(event.data)
            yield from texts or [None]
    except requests.RequestException:  # cut off, or silent for the read timeout
        raise APIError(502, "the upstream model server stopped answering",
                       "server_error") from None
    raise APIError(502, "the upstream model server ended its stream before [DONE]",
                   "server_error")


def tokens_of(event_data: str) -> list[str]:
    """The text of one event of an upstream's stream; an APIError (502) for its error."""
    try:
        value = json.loads(event_data)
        failure = value.get("error")
        texts = [choice["delta"].get("content") or "" for choice in value["choices"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        failure = {"message": "it sent what is no chat.completion.chunk"}
    if failure:
        message = failure.get("message") if isinstance(failure, dict) else failure
        raise APIError(502, f"the upstream model server failed: {message}", "server_error")
    return [text for text in texts if text]


@dataclass(frozen=True)
class CompletionRequest:
    """What a request asks for: the fields this server reads; any other is ignored."""

    model: str
    messages: list
    stream: bool
    max_tokens: int | None
    include_usage: bool

    def prompt(self) -> str:
        """All the text of the messages, which the stand-in's answer depends on."""
        return "\n".join(text_of(message["content"]) for message in self.messages)


def text_of(content: str | list) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def read_request(body: dict, serves_model: bool = True) -> CompletionRequest:
    """The request's fields, checked as OpenAI checks them; an APIError (400, 404) if bad."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be the name of a model, such as " + MODEL, "model")
    if serves_model and model != MODEL:
        message = f"The model {model!r} does not exist: this server serves {MODEL!r}"
        raise APIError(404, message, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise bad(f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    for number, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and good(message)):
            rule = f"an object with a role ({', '.join(sorted(ROLES))}) and a text content"
            raise bad(f"messages[{number}] must be {rule}", f"messages[{number}]")
    stream = body.get("stream", False)
    if stream not in (True, False, None):  # not 1 or "yes": JSON's true and false only
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    usage = options.get("include_usage", False) if isinstance(options, dict) else "not an object"
    if usage not in (True, False, None):
        raise bad("stream_options must be an object such as {\"include_usage\": true}",
                  "stream_options")
    limits = [count_of(body, name) for name in ("max_completion_tokens", "max_tokens")]
    limit = next((limit for limit in limits if limit is not None), None)
    return CompletionRequest(model, messages, bool(stream), limit, bool(usage))


def good(message: dict) -> bool:
    content = message.get("content")
    if isinstance(content, list):
        return all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content)
    return isinstance(content, str)


def count_of(body: dict, name: str) -> int | None:
    value = body.get(name)
    # bool is an int in Python, and true is no number of tokens.
    if value is not None and (type(value) is not int or not 1 <= value <= MAX_TOKENS):
        raise bad(f"{name} must be a whole number from 1 to {MAX_TOKENS}", name)
    return value


class StandInModel:
    """NOT a language model: a deterministic answer, with the timing of one. Say so plainly
    wherever it shows: it stands in for llama.cpp, vLLM or Ollama (see --upstream)."""

    def __init__(self, tokens_per_second: float, first_token_delay: float) -> None:
        if not (0.1 <= tokens_per_second <= 10_000 and 0 <= first_token_delay <= 600):
            raise ValueError("--tokens-per-second takes 0.1 to 10000, --first-token-delay 0 to 600")
        self.interval, self.first_delay = 1 / tokens_per_second, first_token_delay

    def answer(self, prompt: str) -> list[str]:
        """The tokens of the answer to `prompt`: always the same for the same prompt."""
        seed = hashlib.sha256(prompt.encode("utf-8", "replace")).digest()
        count = 3 + seed[0] % 3  # three to five sentences
        picked = [SENTENCES[(seed[1] + 3 * n) % len(SENTENCES)] for n in range(count)]
        return TOKEN.findall(" ".join(picked))

    def generate(self, ask: "CompletionRequest") -> tuple[Iterator[tuple[float, str]], int]:
        """The answer as (seconds the token takes, token) pairs, made one at a time as they
        are asked for, and how many tokens it has."""
        tokens = self.answer(ask.prompt())[: ask.max_tokens]
        delays = [self.first_delay] + [self.interval] * (len(tokens) - 1)
        return (pair for pair in zip(delays, tokens, strict=True)), len(tokens)


def count_tokens(text: str) -> int:
    """Tokens in a text, as the stand-in counts them (a real model has its own tokenizer)."""
    return len(TOKEN.findall(text))


def data(value: dict | str) -> str:
    """One event of OpenAI's stream: a single `data:` line (JSON has no line breaks)."""
    return f"data: {value if isinstance(value, str) else json.dumps(value)}\n\n"


def chunk(name: str, ask: CompletionRequest, delta: dict, finish: str | None = None,
          totals: dict | None = None) -> str:
    """A `chat.completion.chunk` event: a delta (the role, or a token), or the finish reason,
    or, with totals and empty choices, the usage."""
    body = {"id": name, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": ask.model, "system_fingerprint": None}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body["choices"] = [] if totals else [choice]
    if ask.include_usage:  # then every chunk has "usage", null but in the last one
        body["usage"] = totals
    return data(body)


def finish_reason(ask: CompletionRequest, delivered: int) -> str:
    return "length" if delivered == ask.max_tokens else "stop"


def last_chunks(name: str, ask: CompletionRequest, delivered: int) -> Iterator[str]:
    """After the tokens: the finish reason (`length` at the token limit, else `stop`), the
    usage if asked for (its own chunk, choices empty), and `data: [DONE]`, the last event."""
    yield chunk(name, ask, {}, finish_reason(ask, delivered))
    if ask.include_usage:
        yield chunk(name, ask, {}, totals=usage(ask, delivered))
    yield data("[DONE]")


def usage(ask: CompletionRequest, completion_tokens: int) -> dict:
    prompt_tokens = count_tokens(ask.prompt())
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": total}


def completion(ask: CompletionRequest, tokens: list[str]) -> dict:
    """A whole `chat.completion`: the answer to a request with `stream: false`."""
    message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
    finish = finish_reason(ask, len(tokens))
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"id": new_id(), "object": "chat.completion", "created": int(time.time()),
            "model": ask.model, "choices": [choice], "usage": usage(ask, len(tokens))}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def too_many(user_id: str, at_once: int) -> APIError:
    """429, with Retry-After: the official client waits that long, then tries again."""
    message = f"{user_id} has {at_once} answers under way already: wait for one to end"
    return APIError(429, message, "requests", code="rate_limit_exceeded", **{"Retry-After": "5"})


def refuse_key(error: Unauthenticated) -> Response:
    """Step 3's 401 (tokens.py), its Bearer challenge kept, its body in OpenAI's shape."""
    response = ask_for_a_token(error)
    hint = "send your API key as 'Authorization: Bearer <key>'; POST /generate_token mints one"
    code = None if error.description is None else "invalid_api_key"
    body = error_body(APIError(401, error.description or hint, code=code))
    response.set_data(json.dumps(body) + "\n")
    return response


class Hangup:
    """Whether the client has closed its connection. A write to a connection the client has
    closed still succeeds once (the client's system answers it with a reset), so a server
    that only notices failed writes generates a token more than it must. This looks at the
    connection instead: one the client closed reads as b"" at once, and with MSG_PEEK
    nothing is taken from it. It works with the sockets of Werkzeug's server and of
    gunicorn's workers, on Linux and macOS; elsewhere only the failed write ends the stream.
    """

    def __init__(self, environ: dict) -> None:
        self._socket = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")

    def __call__(self) -> bool:
        if self._socket is None or not hasattr(socket, "MSG_DONTWAIT"):
            return False
        # The operating system's own socket on the same connection: plain TCP under TLS
        # too, and never gevent's, which would wait for data instead of answering at once.
        peer = _socket.socket(fileno=self._socket.fileno())
        try:  # MSG_DONTWAIT: this one call does not wait, and the connection stays as it is
            return peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read: the client is still there, reading
            return False
        except OSError:  # reset
            return True
        finally:
            peer.detach()  # let go of the connection without closing it
