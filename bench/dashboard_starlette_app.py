"""Step 10's event stream on Starlette, uvicorn and sse-starlette: the peer of bench.py's viewers
part, what a user would build instead of stream_server_dashboard.py, with ONE sampler shared by
its viewers, as the step has.

GET /events sends `retry:`, the newest sample at once, then each new sample as `event: sample`
with its number as `id:`; a viewer that falls behind gets the newest sample when it can take one
(no backlog), as in the step. The sampler reads the same psutil fields every DASHBOARD_EVERY
seconds (1 by default). sse-starlette writes the events and sends a comment every 15 s. Left out,
because the benchmark does not use them: ?history, Last-Event-ID, /status and the page.
"""

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator

import psutil
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

EVERY = float(os.environ.get("DASHBOARD_EVERY", "1"))


class Sampler:
    """One task reads the host every EVERY seconds; viewers wait on an Event set at each sample."""

    def __init__(self) -> None:
        self.taken, self.newest, self.viewers = 0, "", 0
        self.added = asyncio.Event()

    async def run(self) -> None:
        psutil.cpu_percent()
        sent, received, then = *psutil.net_io_counters()[:2], time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, then + EVERY - time.monotonic()))
            now, counters = time.monotonic(), psutil.net_io_counters()
            sample = {
                "time": round(time.time(), 3),
                "cpu_percent": psutil.cpu_percent(),
                "memory_percent": psutil.virtual_memory().percent,
                "bytes_sent_per_s": round((counters.bytes_sent - sent) / (now - then)),
                "bytes_recv_per_s": round((counters.bytes_recv - received) / (now - then)),
                "viewers": self.viewers,
            }
            sent, received, then = counters.bytes_sent, counters.bytes_recv, now
            self.taken, self.newest = self.taken + 1, json.dumps(sample)
            added, self.added = self.added, asyncio.Event()
            added.set()  # wakes every viewer waiting for this sample


sampler = Sampler()


async def events(request: Request) -> Response:
    async def stream() -> AsyncIterator[ServerSentEvent]:
        sampler.viewers += 1
        try:
            yield ServerSentEvent(retry=2000)
            seen = 0
            while True:
                if sampler.taken == seen:
                    await sampler.added.wait()
                seen = sampler.taken  # the newest, whatever was skipped
                yield ServerSentEvent(sampler.newest, event="sample", id=str(seen))
        finally:
            sampler.viewers -= 1

    return EventSourceResponse(stream(), ping=15)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.create_task(sampler.run())
    yield
    task.cancel()


app = Starlette(routes=[Route("/events", events)], lifespan=lifespan)
