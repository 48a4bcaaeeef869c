"""Step 9's streamed route on Starlette, uvicorn and sse-starlette: the peer of bench.py's
completions part, what a user would build instead of stream_server_llm.py.

POST /v1/chat/completions with `stream: true`, checked by the step's own read_request(), answered
by the step's stand-in model at the same pace (LLM_TOKENS_PER_SECOND, LLM_DELAY: the step's
settings, 20 and 0.5 by default) with the same chunks, in the same order, ending with `data:
[DONE]`; sse-starlette writes the events and sends a comment every 15 s. GET /status answers
{"generating": n, "tokens_generated": k} as the step's does. Left out, because the benchmark does
not use them: `stream: false`, the per-user limit, the relay and the page. Bearer tokens as in
step 3, signed with JWT_SECRET_KEY from the environment.
"""

import asyncio
import os
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette_auth import user_of

import completions  # the step's request checks, chunks and stand-in model

TOKENS_PER_SECOND = float(os.environ.get("LLM_TOKENS_PER_SECOND", "20"))
DELAY = float(os.environ.get("LLM_DELAY", "0.5"))
counts = {"generating": 0, "tokens_generated": 0}


def error(status: int, message: str) -> JSONResponse:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
    return JSONResponse(body, status)


def payload(event: str) -> str:
    """The JSON of one of the step's `data: ...` events: sse-starlette writes the field."""
    return event.removeprefix("data: ").removesuffix("\n\n")


async def chat_completions(request: Request) -> Response:
    if user_of(request) is None:
        return error(401, "Invalid API key")
    try:
        body = await request.json()
        ask = completions.read_request(body if isinstance(body, dict) else {})
    except completions.APIError as failure:
        return JSONResponse(completions.error_body(failure), failure.code)
    except ValueError:
        return error(400, "the body must be JSON")
    if not ask.stream:
        return error(400, "this peer streams only")
    answer, _ = completions.StandInModel(TOKENS_PER_SECOND, DELAY).generate(ask)

    async def events() -> AsyncIterator[str]:
        name, delivered = completions.new_id(), 0
        counts["generating"] += 1
        try:  # sse-starlette cancels this when the client leaves
            yield payload(completions.chunk(name, ask, {"role": "assistant", "content": ""}))
            for delay, token in answer:
                await asyncio.sleep(delay)  # the model at work
                counts["tokens_generated"] += 1
                yield payload(completions.chunk(name, ask, {"content": token}))
                delivered += 1
            for event in completions.last_chunks(name, ask, delivered):
                yield payload(event)
        finally:
            counts["generating"] -= 1

    return EventSourceResponse(events(), ping=15)


async def status(request: Request) -> Response:
    if user_of(request) is None:
        return error(401, "Invalid API key")
    return JSONResponse({**counts, "pid": os.getpid()})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/status", status),
    ]
)
