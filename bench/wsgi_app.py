"""The step 2 stream as a bare WSGI app, with no Flask: a reference for bench.py only.

Served by the same gunicorn command as the steps, it shows what the server alone costs, so
the benchmark can tell Flask's share from gunicorn's. Same route and lines as
stream_server_multiuser.py, without its checks, tracking and log lines.
"""

from collections.abc import Callable, Iterable, Iterator
from time import sleep  # gunicorn's gevent worker patches it, as it does for the steps
from urllib.parse import parse_qs


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    user_id = environ["PATH_INFO"].removeprefix("/stream/")
    query = parse_qs(environ["QUERY_STRING"])
    count = int(query.get("count", ["10"])[0])
    interval = float(query.get("interval", ["0.5"])[0])
    # No Content-Length, so gunicorn sends the body with Transfer-Encoding: chunked.
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
    return lines(user_id, count, interval)


def lines(user_id: str, count: int, interval: float) -> Iterator[bytes]:
    for number in range(1, count + 1):
        if number > 1 and interval:
            sleep(interval)
        elif number % 500 == 0:
            sleep(0.000001)  # the others' turn, as in the steps (TURN)
        yield f"chunk {number} of {count} for {user_id}\n".encode()
