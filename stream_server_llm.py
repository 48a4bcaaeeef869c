"""Step 9: an answer streamed token by token, the way LLM APIs stream it (OpenAI's format).

New since step 4: the events are OpenAI's Chat Completions chunks, which the official
openai client reads unchanged; a POST starts the stream (the page reads it with fetch).
The model generates only while someone reads: a client that leaves stops it within one
token. With --upstream URL it relays another server's stream (llama.cpp, vLLM, Ollama).
Step 3's tokens are the API keys; the model is a stand-in, NOT a language model.

    export JWT_SECRET_KEY="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python stream_server_llm.py                  # serves http://127.0.0.1:5000 (the page)
    python stream_client_llm.py "Why stream?"    # or: python examples/openai_client.py
"""

import argparse
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from time import sleep

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

# OpenAI's request checks, chunks and errors, and the stand-in model: see completions.py.
import completions
from completions import APIError, CompletionRequest

# What a server needs to face slow, silent and hostile clients, shared: see serving.py.
from serving import RequestHandler, tls_context

# Step 3's tokens, shared: see tokens.py. The access token is the API key.
from tokens import Unauthenticated, authenticated_user, load_secret_key, tokens

logger = logging.getLogger(__name__)
app = Flask(__name__)
app.register_blueprint(tokens)  # POST /generate_token, and 401s for bad tokens
app.register_error_handler(Unauthenticated, completions.refuse_key)  # in OpenAI's shape
app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a long conversation; a bigger body gets 413
app.config["TOKENS_PER_SECOND"] = 20.0  # the stand-in's pace
app.config["DELAY"] = 0.5  # seconds before the stand-in's first token, as a model reads
app.config["AT_ONCE"] = 4  # generations one user may have open; one more gets 429
app.config["UPSTREAM"] = None  # an OpenAI-compatible server's base URL: be its gateway
app.config.from_prefixed_env("LLM")  # no flags under gunicorn: LLM_UPSTREAM=URL gunicorn ...

HEARTBEAT = 15.0  # seconds: a quiet stream sends a comment this often, or proxies may cut it


class StreamTracker:
    """Counts open streams per user. Every request runs in its own thread, so a lock guards it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()
        self._served = 0

    def start(self, user_id: str) -> bool:
        with self._lock:
            # Checked and counted under one lock: ten requests at once cannot all slip in.
            if self._active[user_id] >= app.config["AT_ONCE"]:
                return False
            self._active[user_id] += 1
        return True

    def stop(self, user_id: str) -> None:
        with self._lock:
            self._active[user_id] -= 1
            if not self._active[user_id]:
                del self._active[user_id]

    def generated(self, count: int = 1) -> None:
        with self._lock:
            self._served += count

    def snapshot(self) -> dict:
        with self._lock:
            # Each process counts only its own streams: under gunicorn with several
            # workers, the pid says which worker these numbers belong to.
            generating = sum(self._active.values())
            return {"generating": generating, "tokens_generated": self._served, "pid": os.getpid()}


tracker = StreamTracker()


def pause(seconds: float) -> Iterator[str]:
    """Wait `seconds`, sending a comment line every HEARTBEAT seconds meanwhile."""
    while seconds > HEARTBEAT:
        sleep(HEARTBEAT)
        seconds -= HEARTBEAT
        yield ": keep-alive\n\n"  # a comment: every client ignores it, but the line stays busy
    sleep(seconds)


def generation(
    user_id: str, ask: CompletionRequest, answer: Iterator[tuple[float, str]], planned: int,
    hangup: completions.Hangup,
) -> Iterator[str]:
    """Yield the answer as OpenAI's chunks: the role, a token each, the finish, [DONE]."""
    # The generator runs after the view has returned, when Flask's request context
    # is gone: touching `request` here would raise. So the view reads everything it
    # needs and passes plain values in (flask.stream_with_context is the other way).
    delivered, name = 0, completions.new_id()
    ending = "left after %d of %d tokens; generation stopped"  # unless it ends otherwise
    try:
        yield completions.chunk(name, ask, {"role": "assistant", "content": ""})
        for delay, token in answer:
            yield from pause(delay)  # the model at work
            # Every token costs: stop as soon as nobody reads, not a token later (see Hangup).
            if hangup():
                return
            if token is None:  # an upstream still at work: keep this line busy too
                yield ": keep-alive\n\n"
                continue
            tracker.generated()
            yield completions.chunk(name, ask, {"content": token})
            # Execution only comes back here once the server has written the chunk.
            delivered += 1
        yield from completions.last_chunks(name, ask, delivered)  # finish, usage, [DONE]
        ending = "got the whole answer: %d tokens (of at most %d)"
    except APIError as error:  # an upstream that failed: the status line is long gone
        ending = f"lost the upstream ({error.description.replace('%', '%%')}) after %d of %d"
        yield completions.data(completions.error_body(error))
    finally:
        # Runs when the stream ends and also when the client hangs up: Werkzeug
        # closes the generator as soon as writing to the socket fails.
        answer.close()  # a relay hangs up on its upstream, which stops generating too
        logger.info("%s " + ending, user_id, delivered, planned)
        tracker.stop(user_id)  # without it, a user who left would count as streaming forever


def relay(ask: CompletionRequest) -> tuple[Iterator[tuple[float, str]], int]:
    """Ask the upstream (a 502 or 504 now if it fails), then pass its tokens on as they come."""
    # Its key, UPSTREAM_API_KEY, goes from here to the upstream only, never to a client.
    upstream = completions.open_upstream(app.config["UPSTREAM"], ask)

    def tokens() -> Iterator[tuple[float, str | None]]:
        with upstream:  # closed when this generator is: the upstream sees its client leave
            # Each piece the moment it arrives, as step 4's client reads: nothing waits.
            # A piece with no token in it (a comment, say) is None: see generation().
            for text in completions.upstream_tokens(upstream.iter_content(chunk_size=None)):
                yield 0.0, text

    return tokens(), ask.max_tokens or completions.MAX_TOKENS


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    """Answer a conversation: streamed as events with `stream: true`, else as one object."""
    # Validate before returning: once the first chunk is out, the status line
    # and headers are sent and a 400 is no longer possible.
    user_id = authenticated_user()
    ask = completions.read_request(completions.json_body(), not app.config["UPSTREAM"])
    if not tracker.start(user_id):
        raise completions.too_many(user_id, app.config["AT_ONCE"])
    streaming = False
    try:
        model = completions.StandInModel(app.config["TOKENS_PER_SECOND"], app.config["DELAY"])
        answer, planned = relay(ask) if app.config["UPSTREAM"] else model.generate(ask)
        if ask.stream:  # from here on, generation() counts the stream, and ends the count
            hangup, streaming = completions.Hangup(request.environ), True  # the request's socket
            return sse_response(generation(user_id, ask, answer, planned, hangup))
        text = [token for delay, token in answer if sleep(delay) is None and token]
        tracker.generated(len(text))  # not streamed: the same tokens, the same text, at once
        return jsonify(completions.completion(ask, text))
    finally:
        if not streaming:
            tracker.stop(user_id)


@app.get("/v1/models")
def models() -> Response:
    """The one model this server serves (a gateway: its upstream's), in OpenAI's list shape."""
    authenticated_user()
    return jsonify(completions.model_list(app.config["UPSTREAM"]))


def sse_response(body: Iterator[str]) -> Response:
    """The events as one long response that no cache keeps and no proxy holds back."""
    headers = {
        "Cache-Control": "no-cache",
        # Tells nginx not to buffer this response; other proxies have their own switch.
        "X-Accel-Buffering": "no",
    }
    # No Content-Length: the length is unknown until the generator is done,
    # which is exactly what makes Werkzeug use Transfer-Encoding: chunked.
    return Response(body, mimetype="text/event-stream", headers=headers)


@app.get("/status")
def status() -> Response:
    """Generations open now, tokens generated so far, and which process counts them."""
    authenticated_user()  # for callers with a valid token (a real service: operators only)
    return jsonify(tracker.snapshot())


@app.get("/")
def index() -> Response:
    """What this server offers, for whoever opens it in a browser or with curl."""
    return app.send_static_file("llm.html")


@app.errorhandler(HTTPException)
def error_as_json(error: HTTPException) -> Response:
    """Answer every HTTP error (400, 404, 405, 500...) as JSON, never as an HTML page."""
    response = error.get_response()
    # The final newline, as jsonify writes it, keeps curl's output off the shell prompt.
    response.set_data(json.dumps(completions.error_body(error)) + "\n")
    response.content_type = "application/json"
    return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    parser.add_argument("--tokens-per-second", type=float, default=20.0, help="the model's pace")
    parser.add_argument("--first-token-delay", type=float, default=0.5, help="seconds before it")
    parser.add_argument("--upstream", help="relay this OpenAI-compatible server (its base URL)")
    parser.add_argument("--cert", help="certificate file (PEM): serve HTTPS only, with --key")
    parser.add_argument("--key", help="the certificate's private key file (PEM)")
    args = parser.parse_args()
    try:
        context = tls_context(args.cert, args.key)  # None without them: plain HTTP
        completions.StandInModel(args.tokens_per_second, args.first_token_delay)  # or ValueError
        args.upstream = args.upstream and completions.base_url(args.upstream)
    except ValueError as error:
        parser.error(str(error))
    app.config.update(UPSTREAM=args.upstream, DELAY=args.first_token_delay)
    app.config["TOKENS_PER_SECOND"] = args.tokens_per_second
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # One thread per request is what lets users stream side by side. With
    # threaded=False the server handles one request at a time: the second user's
    # stream (and even GET /status) waits until the first stream has ended, and
    # Werkzeug falls back to HTTP/1.0, so nothing is sent chunked any more.
    app.config["JWT_SECRET_KEY"] = load_secret_key()
    app.run(host=args.host, port=args.port, threaded=True, request_handler=RequestHandler,
            ssl_context=context)
