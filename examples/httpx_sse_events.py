"""Step 4's Server-Sent Events read with httpx and httpx-sse, which parses the events.

    python stream_server_sse.py                        # in one terminal
    python examples/httpx_sse_events.py                # in another
"""

import sys

import httpx
from httpx_sse import connect_sse

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
timeout = httpx.Timeout(10.0, read=70.0)  # the server sends a comment every 15 s at least
with (
    httpx.Client(timeout=timeout) as client,
    connect_sse(client, "GET", f"{url}/events/User1?count=3&interval=0.5") as source,
):
    for event in source.iter_sse():
        if not event.data:  # the first block only sets `retry:`; browsers dispatch nothing for it
            continue
        print(f"{event.event} {event.id}: {event.data}")
        if event.event == "end":  # the server's last event: do not reconnect
            break
