"""Step 2's chunked stream read with httpx instead of requests, synchronously.

    python stream_server_multiuser.py                  # in one terminal
    python examples/httpx_stream.py                    # in another
"""

import sys

import httpx

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
# The read timeout is per read, not for the whole stream: longer than the longest silence.
timeout = httpx.Timeout(10.0, read=70.0)
with httpx.stream("GET", f"{url}/stream/User1?count=3&interval=0.5", timeout=timeout) as response:
    response.raise_for_status()
    # iter_raw() yields the bytes as each read returns them, like requests' chunk_size=None.
    for data in response.iter_raw():
        print(data.decode(), end="", flush=True)
