"""Step 1: stream_server.py, stream_client.py and show_chunks.py."""

import re
import tracemalloc

import pytest
from flask import Flask

import show_chunks
import stream_client
import stream_server as server
import stream_server_multiuser_secure as secure_server
import stream_server_sse as sse_server
from helpers import TEST_KEY, chunked, free_port, raw_get

pytestmark = pytest.mark.step(server)

CHUNK_LINE = re.compile(r"\+\d+\.\d\ds  chunk (\d+) of (\d+)")


@pytest.fixture
def client():
    return server.app.test_client()


# Through Flask's test client


def test_index_says_what_to_call(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "/stream?count=N&interval=SECONDS" in response.text


def test_stream_sends_count_lines_with_streaming_headers(client, pauses):
    response = client.get("/stream?count=3&interval=0.25")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in response.headers
    assert response.text == "chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n"
    assert pauses == [0.25, 0.25]  # between chunks, never before the first


def test_defaults_are_ten_chunks_half_a_second_apart(client, pauses):
    assert client.get("/stream").text.count("\n") == 10
    assert pauses == [0.5] * 9


def test_interval_zero_sends_without_pausing(client, pauses):
    assert client.get("/stream?count=3&interval=0").text.count("\n") == 3
    assert pauses == []


def test_each_chunk_is_produced_only_when_the_one_before_was_taken(client, pauses):
    response = client.get("/stream?count=3&interval=2", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"chunk 1 of 3\n"
    assert pauses == []  # the first chunk came out before the server paused at all
    assert next(chunks) == b"chunk 2 of 3\n"
    assert pauses == [2]
    response.close()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("count=abc", "count"),
        ("count=", "count"),
        ("count=1.5", "count"),
        ("count=0", "count"),
        ("count=-3", "count"),
        ("count=1000001", "count"),
        ("interval=soon", "interval"),
        ("interval=-0.1", "interval"),
        ("interval=60.5", "interval"),
        ("interval=nan", "interval"),
        ("interval=inf", "interval"),
        # int() and float() would take these; a query string takes plain ASCII digits only.
        ("count=%D9%A1%D9%A2", "count"),  # Arabic-Indic digits
        ("count=%EF%BC%91%EF%BC%92", "count"),  # full-width digits
        ("count=%205%20", "count"),
        ("count=%2B5", "count"),
        ("count=1_000", "count"),
        ("interval=1e1", "interval"),
        ("interval=%2B0.5", "interval"),
        ("interval=.5", "interval"),
    ],
)
def test_bad_numbers_get_400_json_before_streaming(client, query, name):
    response = client.get(f"/stream?{query}")
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.json["error"].startswith(f"{name} must be")


@pytest.mark.parametrize("query", ["count=1", "count=1000000", "interval=0", "interval=60"])
def test_limits_are_inclusive(client, query):
    response = client.get(f"/stream?{query}", buffered=False)
    assert response.status_code == 200
    response.close()


def test_json_errors_end_with_a_newline(client):
    # Without it, curl's output runs into the shell prompt.
    assert client.get("/stream?count=0").text.endswith("}\n")


def test_unknown_paths_and_methods_get_json_errors(client):
    assert client.get("/nope").json["error"]
    response = client.post("/stream")
    assert response.status_code == 405
    assert response.json["error"]


def test_a_huge_stream_is_never_held_in_memory(client, monkeypatch):
    monkeypatch.setattr(server, "sleep", lambda seconds: None)
    response = client.get("/stream?count=300000&interval=0", buffered=False)
    tracemalloc.start()
    try:
        total = sum(len(chunk) for chunk in response.response)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    response.close()
    assert total > 300_000 * len("chunk 1 of 300000\n")
    assert peak < 256 * 1024  # what 300,000 chunks would take if kept: several MB


# Against the real server, on the wire


def test_the_wire_carries_http11_chunked_framing(serve):
    answer = raw_get(serve(server.app), "/stream?count=3&interval=0")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert body == chunked(b"chunk 1 of 3\n", b"chunk 2 of 3\n", b"chunk 3 of 3\n")


def test_the_first_chunk_is_on_the_wire_before_the_second_exists(serve, gated):
    url = serve(server.app) + "/stream?count=2&interval=5"
    sock, wire = show_chunks.send_request(url, [])
    with sock, wire:
        assert "Transfer-Encoding: chunked" in show_chunks.read_head(wire)
        chunks = show_chunks.read_chunks(wire)
        assert next(chunks) == (b"d\r\n", b"chunk 1 of 2\n")
        gated.wait_for_pause()  # the server is still holding chunk 2 back
        gated.open()
        assert list(chunks) == [(b"d\r\n", b"chunk 2 of 2\n"), (b"0\r\n", b"")]


def test_client_prints_each_chunk_and_a_summary(serve, capsys):
    url = serve(server.app)  # --url is the server's base URL, as in every step
    assert stream_client.main(["--url", url, "--count", "3", "--interval", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [CHUNK_LINE.fullmatch(line).groups() for line in lines[:3]] == [
        ("1", "3"),
        ("2", "3"),
        ("3", "3"),
    ]
    assert re.fullmatch(r"done: 3 chunks, 39 bytes in \d+\.\d\ds", lines[3])


def test_a_trailing_slash_on_the_url_is_dropped(serve, capsys):
    assert stream_client.main(["--url", serve(server.app) + "/", "--count", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: 2 chunks")


@pytest.mark.parametrize("path", ["/stream", "/stream?count=2", "/anything/"])
def test_a_url_with_a_path_gets_one_line_saying_so(serve, capsys, path):
    url = serve(server.app) + path
    assert stream_client.main(["--url", url, "--count", "2"]) == 1
    assert capsys.readouterr() == (
        "",
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}\n",
    )


@pytest.mark.parametrize("url", ["ws://127.0.0.1:5000", "localhost:5000", "127.0.0.1:5000"])
def test_a_url_that_is_not_http_gets_one_line_saying_so(capsys, url):
    assert stream_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}\n"
    )


def page() -> Flask:
    """Some other web app, which answers /stream with a page."""
    app = Flask("some_other_app")
    app.get("/stream")(lambda: "<p>not a stream</p>")
    return app


@pytest.mark.parametrize(
    ("other", "answer"),
    [
        (sse_server.app, "404"),  # another step's server, still running on the port
        (secure_server.app, "401"),
        (page(), "200 text/html; charset=utf-8"),
    ],
    ids=["step 4", "step 3", "a page"],
)
def test_client_says_which_server_to_start_when_another_answers(
    serve, monkeypatch, capsys, other, answer
):
    monkeypatch.setitem(secure_server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    url = serve(other)
    assert stream_client.main(["--url", url, "--count", "2"]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: {url}/stream answered {answer}: it is not step 1's server. "
        "Start it with: python stream_server.py\n",
    )


def test_client_says_which_server_to_start_when_an_https_one_answers(serve, tls, capsys):
    # Step 3's server started with --cert: it closes a plain HTTP connection unanswered.
    url = serve(secure_server.app, tls.server_context).replace("https://", "http://")
    assert stream_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: {url}/stream gave no HTTP answer: it is not step 1's server. "
        "Start it with: python stream_server.py\n"
    )


def test_client_says_when_the_server_is_not_running(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert stream_client.main(["--url", url]) == 1
    error = capsys.readouterr().err
    assert error == (
        f"error: cannot connect to {url}/stream: is the server running? "
        "Start it with: python stream_server.py\n"
    )


def test_client_prints_the_servers_error(serve, capsys):
    url = serve(server.app)
    assert stream_client.main(["--url", url, "--count", "0"]) == 1
    assert capsys.readouterr().err == (
        "error: server answered 400: count must be a whole number from 1 to 1000000, got '0'\n"
    )


def test_client_reports_a_stream_cut_off_midway(serve, drop_connection, capsys):
    drop_connection(at_pause=1)
    url = serve(server.app)
    assert stream_client.main(["--url", url, "--count", "3"]) == 1
    captured = capsys.readouterr()
    assert "chunk 1 of 3" in captured.out
    assert captured.err == "error: the stream was cut off before its end\n"


def test_client_gives_up_when_the_server_goes_silent(serve, gated, monkeypatch):
    monkeypatch.setattr(stream_client, "READ_TIMEOUT", 0.2)
    chunks = stream_client.stream_chunks(serve(server.app) + "/stream", count=2, interval=5)
    assert next(chunks) == "chunk 1 of 2\n"
    with pytest.raises(stream_client.StreamError, match=r"sent nothing for 0\.2s"):
        next(chunks)


def test_client_exits_quietly_on_ctrl_c(monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(stream_client, "stream_chunks", interrupted)
    assert stream_client.main([]) == 130
    assert capsys.readouterr() == ("", "")


def test_show_chunks_prints_size_lines_and_payloads(serve, capsys):
    url = serve(server.app) + "/stream?count=2&interval=0"
    assert show_chunks.main([url]) == 0
    out = capsys.readouterr().out
    assert "Transfer-Encoding: chunked" in out
    assert re.search(r"size b'd\\r\\n' = 13 bytes  b'chunk 2 of 2\\n'", out)
    assert out.rstrip().endswith("size b'0\\r\\n' = 0 bytes  b''")


def test_show_chunks_rejects_broken_framing():
    import io

    with pytest.raises(show_chunks.FramingError, match="bad chunk size"):
        list(show_chunks.read_chunks(io.BytesIO(b"zz\r\nhello\r\n")))
    with pytest.raises(show_chunks.FramingError, match="before the final"):
        list(show_chunks.read_chunks(io.BytesIO(b"5\r\nhello\r\n")))
