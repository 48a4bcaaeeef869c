"""Step 2's chunked stream read with httpx on asyncio: three users at once, in one thread.

    python stream_server_multiuser.py                  # in one terminal
    python examples/httpx_stream_async.py              # in another
"""

import asyncio
import sys

import httpx

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"


async def follow(client: httpx.AsyncClient, user: str) -> None:
    async with client.stream("GET", f"{url}/stream/{user}?count=3&interval=0.5") as response:
        response.raise_for_status()
        # aiter_raw() awaits each read: while one stream is quiet, the others run.
        async for data in response.aiter_raw():
            print(data.decode(), end="", flush=True)


async def main() -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=70.0)) as client:
        await asyncio.gather(*(follow(client, user) for user in ["User1", "User2", "User3"]))


asyncio.run(main())
