"""The chat step's room on Starlette and uvicorn with redis.asyncio: a reference for bench.py only.

Built to stream_server_chat.py's wire interface as far as the benchmark uses it, with the same
design: a message is XADDed to the room's Redis Stream; each process reads new messages with ONE
Redis connection and queues each for every subscriber, in a bounded queue each. POST
/rooms/<room>/messages (Bearer token, JSON {"text": ...}) answers 201 with {"id": ...}; GET
/rooms/<room>/events sends `retry:`, then one event per message (`id:`, `event: message`, the same
JSON data), comments every 15 s, and `event: overflow` to a subscriber that falls 1,000 behind.
Left out, because the benchmark does not use them: Last-Event-ID, presence, tokens minted here,
and telling Redis errors apart. REDIS_URL and JWT_SECRET_KEY come from the environment.
"""

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import redis.asyncio as redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette_auth import user_of

QUEUE = 1000  # messages waiting for one subscriber, as in the chat step
HISTORY = 1000  # messages a room keeps, about (XADD MAXLEN ~)
HEARTBEAT = 15.0  # seconds between comments, which keep quiet streams busy


class Broker:
    """One connection pool to write, ONE connection to read, and a queue per subscriber."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.reader = redis.Redis.from_url(
            url, decode_responses=True, single_connection_client=True
        )
        self.cursors: dict[str, str] = {}  # room: the newest id queued here
        self.inboxes: dict[str, set[asyncio.Queue]] = {}

    async def subscribe(self, room: str) -> asyncio.Queue:
        inbox: asyncio.Queue = asyncio.Queue(QUEUE + 1)  # one more, for `overflow`
        if room not in self.cursors:  # new messages are those after the newest one now
            newest = await self.redis.xrevrange(f"chat:{room}", count=1)
            self.cursors.setdefault(room, newest[0][0] if newest else "0-0")
        self.inboxes.setdefault(room, set()).add(inbox)
        return inbox

    async def read(self) -> None:
        """Wait for new messages in the rooms followed here; queue each for every subscriber.
        Without a wake-up key, a room followed for the first time is read within a second."""
        while True:
            streams = {f"chat:{room}": cursor for room, cursor in self.cursors.items()}
            if not streams:
                await asyncio.sleep(0.1)
                continue
            for key, messages in await self.reader.xread(streams, count=100, block=1000):
                room = key.removeprefix("chat:")
                for message_id, fields in messages:
                    self.cursors[room] = message_id
                    seconds = int(message_id.partition("-")[0]) // 1000
                    data = {"id": message_id, "user": fields["user"], "text": fields["text"]}
                    data["time"] = seconds
                    text = f"id: {message_id}\nevent: message\ndata: {json.dumps(data)}\n\n"
                    for inbox in list(self.inboxes.get(room, ())):
                        if inbox.qsize() < QUEUE:
                            inbox.put_nowait(text)
                        else:  # too slow: let it go
                            self.inboxes[room].discard(inbox)
                            inbox.put_nowait(None)

    async def beat(self) -> None:
        """A comment to every stream every HEARTBEAT seconds: one task, rather than a timer
        per stream waiting for its next message (asyncio.wait_for costs a task each time)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            for inbox in [inbox for each in self.inboxes.values() for inbox in each]:
                if inbox.qsize() < QUEUE:
                    inbox.put_nowait(": keep-alive\n\n")


broker = Broker(os.environ["REDIS_URL"])


async def post_message(request: Request) -> Response:
    user = user_of(request)
    if user is None:
        return JSONResponse({"error": "invalid_token"}, 401)
    try:
        text = (await request.json()).get("text")
    except (ValueError, AttributeError):
        text = None
    if not isinstance(text, str) or not 1 <= len(text) <= 1000 or not text.strip():
        return JSONResponse({"error": "text must be a string of 1 to 1000 characters"}, 400)
    room = request.path_params["room"]
    fields = {"user": user, "text": text}
    message_id = await broker.redis.xadd(f"chat:{room}", fields, maxlen=HISTORY, approximate=True)
    return JSONResponse({"id": message_id}, 201)


async def events(request: Request) -> Response:
    if user_of(request) is None:
        return JSONResponse({"error": "invalid_token"}, 401)
    room = request.path_params["room"]
    inbox = await broker.subscribe(room)

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n"
            while True:
                text = await inbox.get()
                if text is None:
                    yield 'event: overflow\ndata: {"last_id": null}\n\n'
                    return
                yield text
        finally:  # the client left (Starlette cancels the stream) or it was let go
            broker.inboxes.get(room, set()).discard(inbox)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(broker.read()), asyncio.create_task(broker.beat())]
    yield
    for task in tasks:
        task.cancel()


app = Starlette(
    routes=[
        Route("/rooms/{room}/messages", post_message, methods=["POST"]),
        Route("/rooms/{room}/events", events),
    ],
    lifespan=lifespan,
)
