"""The step 2 stream as an asyncio app (Starlette on uvicorn): a reference for bench.py only.

The same route and lines as stream_server_multiuser.py, with `await asyncio.sleep`
where the Flask generator calls `sleep`, so the benchmark compares servers, not streams.
"""

import asyncio
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route


async def stream(request: Request) -> StreamingResponse:
    user_id = request.path_params["user_id"]
    count = int(request.query_params.get("count", 10))
    interval = float(request.query_params.get("interval", 0.5))

    async def lines() -> AsyncIterator[str]:
        for number in range(1, count + 1):
            if number > 1 and interval:
                await asyncio.sleep(interval)
            elif number % 500 == 0:
                await asyncio.sleep(0)  # the others' turn, as in the steps (TURN)
            yield f"chunk {number} of {count} for {user_id}\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/plain", headers=headers)


app = Starlette(routes=[Route("/stream/{user_id}", stream)])
