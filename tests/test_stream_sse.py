"""Step 4: stream_server_sse.py and stream_client_sse.py (the browser page: test_browser.py)."""

import itertools
import os
import re
import select
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from flask import Flask, Response, request

import stream_client_sse as sse_client
import stream_server_multiuser
import stream_server_sse as server
from helpers import ROOT, WAIT, free_port, only_help
from stream_client_sse import Event, SSEParser

pytestmark = pytest.mark.step(server)

# One stream that uses every rule: LF, CRLF and CR line ends, comments, multi-line
# data, a field with no space after its colon, ids (one with a NUL, ignored), retry
# (one that is not a number, ignored), an event with no data (not dispatched).
TRICKY = (
    ": a comment, then an event with the default type\n"
    "data: first\n\n"
    "id: 7\r\nevent: chunk\r\ndata: line one\r\ndata:line two\r\ndata:  two spaces\r\n\r\n"
    "retry: 1500\rretry: soon\rid: bad\0id\revent: nothing\r\r"
    "event: token\ndata\ndata: \n\n"
    "id: 8\ndata: no type, new id\n\n"
)
EXPECTED = [
    Event("message", "first", ""),
    Event("chunk", "line one\nline two\n two spaces", "7"),
    Event("token", "\n", "7"),
    Event("message", "no type, new id", "8"),
]


def parse_in_pieces(text: str, cuts: list[int]) -> list[Event]:
    parser = SSEParser()
    bounds = [0, *cuts, len(text)]
    events = [e for start, end in itertools.pairwise(bounds) for e in parser.feed(text[start:end])]
    assert parser.retry_ms == 1500
    return events


def test_parser_reads_every_rule_in_one_piece():
    assert parse_in_pieces(TRICKY, []) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(TRICKY)))
def test_parser_gives_the_same_events_whatever_the_split(cut):
    assert parse_in_pieces(TRICKY, [cut]) == EXPECTED


def test_parser_gives_the_same_events_one_character_at_a_time():
    assert parse_in_pieces(TRICKY, list(range(1, len(TRICKY)))) == EXPECTED


def test_a_crlf_cut_between_its_cr_and_its_lf_is_one_line_end():
    parser = SSEParser()
    assert parser.feed("data: a\r") == []
    assert parser.feed("\ndata: b\r\n") == []  # "\r" + "\n" was one line end, not two
    assert parser.feed("\r\n") == [Event("message", "a\nb", "")]


# The server, through Flask's test client


@pytest.fixture
def client(pauses):
    return server.app.test_client()


def test_events_are_framed_as_server_sent_events(client, pauses):
    response = client.get("/events/Alice?count=2&interval=0.5")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.text == (
        "retry: 2000\n\n"
        "id: 1\nevent: chunk\ndata: chunk 1 of 2 for Alice\n\n"
        "id: 2\nevent: chunk\ndata: chunk 2 of 2 for Alice\n\n"
        "event: end\ndata: end of stream\n\n"
    )
    assert pauses == [0.5]


def test_the_python_parser_reads_what_the_server_writes(client):
    parser = SSEParser()
    events = parser.feed(client.get("/events/Bob?count=3").text)
    assert [(e.type, e.id) for e in events] == [
        ("chunk", "1"),
        ("chunk", "2"),
        ("chunk", "3"),
        ("end", "3"),
    ]


def test_last_event_id_resumes_right_after_it(client):
    response = client.get("/events/Alice?count=5&interval=0", headers={"Last-Event-ID": "3"})
    ids = [e.id for e in SSEParser().feed(response.text) if e.type == "chunk"]
    assert ids == ["4", "5"]


def test_last_event_id_in_the_query_resumes_too(client):
    """What a page sends once its EventSource has given up: a new one sends no header."""
    response = client.get("/events/Alice?count=5&interval=0&last_event_id=3")
    assert [e.id for e in SSEParser().feed(response.text) if e.type == "chunk"] == ["4", "5"]
    bad = client.get("/events/Alice?last_event_id=x")
    assert bad.status_code == 400
    # The header wins: EventSource's own reconnection sends it with the page's query.
    both = client.get("/events/Alice?count=5&interval=0&last_event_id=1",
                      headers={"Last-Event-ID": "4"})
    assert [e.id for e in SSEParser().feed(both.text) if e.type == "chunk"] == ["5"]


def test_resuming_past_the_end_only_ends(client):
    response = client.get("/events/Alice?count=5", headers={"Last-Event-ID": "5"})
    assert [e.type for e in SSEParser().feed(response.text)] == ["end"]


@pytest.mark.parametrize("last_id", ["x", "-1", "1.5", "+3", "12345678"])
def test_a_bad_last_event_id_gets_400(client, last_id):
    response = client.get("/events/Alice", headers={"Last-Event-ID": last_id})
    assert response.status_code == 400
    assert response.json == {"error": "Last-Event-ID must be the id of an event this server sent"}


def test_long_gaps_carry_keep_alive_comments(client, pauses, monkeypatch):
    monkeypatch.setattr(server, "HEARTBEAT", 1.0)
    text = client.get("/events/Alice?count=2&interval=2.5").text
    between = text.split("data: chunk 1 of 2 for Alice\n\n")[1].split("id: 2")[0]
    assert between == ": keep-alive\n\n: keep-alive\n\n"
    assert pauses == [1.0, 1.0, 0.5]


def test_tokens_arrive_one_word_each_and_end(client):
    events = SSEParser().feed(client.get("/tokens?interval=0").text)
    tokens = [e for e in events if e.type == "token"]
    assert "".join(e.data for e in tokens).startswith("Server-Sent Events carry text")
    assert all(len(e.data.split()) == 1 for e in tokens)
    assert [e.id for e in tokens] == [str(n) for n in range(1, len(server.WORDS) + 1)]
    assert events[-1].type == "end"


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/events/bad%20user", "user_id must be"),
        ("/events/Alice?count=0", "count must be"),
        ("/events/Alice?count=%EF%BC%95", "count must be"),
        ("/events/..", "user_id must be"),
        ("/events/Alice?interval=-1", "interval must be"),
        ("/tokens?interval=x", "interval must be"),
    ],
)
def test_bad_input_gets_400_json(client, path, error):
    response = client.get(path)
    assert response.status_code == 400
    assert response.json["error"].startswith(error)


def test_status_counts_the_open_streams_by_name(client, monkeypatch):
    monkeypatch.setattr(server, "tracker", server.StreamTracker())  # nobody streaming yet
    streams = [client.get(path, buffered=False) for path in ("/events/Alice", "/tokens")]
    for response in streams:
        next(iter(response.response))  # the stream has started
    active = {"events for Alice": 1, "tokens": 1}
    assert client.get("/status").json == {"active": active, "served": 2, "pid": os.getpid()}
    for response in streams:
        response.close()  # what the server does when a client hangs up
    assert client.get("/status").json == {"active": {}, "served": 2, "pid": os.getpid()}


def test_the_page_is_served(client):
    with client.get("/") as response:  # closing it closes the file it was sent from
        assert response.mimetype == "text/html"
        assert "new EventSource(" in response.text
        assert "response.body" in response.text


# The client, against the real server


def test_client_prints_events_as_they_come(serve, pauses, capsys):
    argv = ["Alice", "--url", serve(server.app), "--count", "2", "--interval", "0"]
    assert sse_client.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [
        "#1 chunk: chunk 1 of 2 for Alice",
        "#2 chunk: chunk 2 of 2 for Alice",
        "end: end of stream",
    ]
    # Each line starts with the seconds since the client started: a few, never less than 0.
    assert all(re.match(r"\+\d\.\d\ds  ", line) for line in lines), lines


def test_client_resumes_after_the_server_drops_the_connection(
    serve, drop_connection, monkeypatch, capsys
):
    drop_connection(at_pause=1)  # after event 1
    monkeypatch.setattr(server, "RETRY_MS", 10)
    events = list(sse_client.follow(f"{serve(server.app)}/events/Alice", {"count": 5}))
    assert [e.id for e in events if e.type == "chunk"] == ["1", "2", "3", "4", "5"]
    assert events[-1].type == "end"
    assert "(the connection was lost; resuming after event 1 in 0.01s)" in capsys.readouterr().out


def test_client_prints_the_token_text(serve, pauses, capsys):
    assert sse_client.main(["--tokens", "--url", serve(server.app)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Server-Sent Events carry text from a server to a browser")
    _, end = out.splitlines()  # the words on one line; the end on its own
    assert re.fullmatch(r"\+\d+\.\d\ds  end: end of stream", end)


def test_client_stops_quietly_on_ctrl_c(monkeypatch, capsys):
    def interrupted(url, params):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(sse_client, "follow", interrupted)
    assert sse_client.main([]) == 130  # the usual exit status after Ctrl-C
    assert capsys.readouterr() == ("", "")


def test_the_client_script_runs_as_a_program():
    assert only_help("stream_client_sse.py")


def test_client_reports_bad_input_and_a_missing_server(serve, capsys):
    assert sse_client.main(["bad user", "--url", serve(server.app)]) == 1
    assert capsys.readouterr().err.startswith("error: server answered 400: user_id must be")
    url = f"http://127.0.0.1:{free_port()}"
    assert sse_client.main(["--url", url]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot connect to {url}/events/User1: is the server running? "
        "Start it with: python stream_server_sse.py\n"
    )


def page() -> Flask:
    """Some other web app, which answers every path with a page."""
    app = Flask("some_other_app")
    app.get("/<path:anything>")(lambda anything: "<p>not a stream</p>")
    return app


@pytest.mark.parametrize(
    ("other", "answer"),
    [(stream_server_multiuser.app, "404"), (page(), "200 text/html; charset=utf-8")],
    ids=["step 2", "a page"],
)
def test_client_says_which_server_to_start_when_another_answers(serve, capsys, other, answer):
    url = serve(other)
    assert sse_client.main(["--url", url]) == 1
    assert capsys.readouterr() == (
        "",
        f"error: {url}/events/User1 answered {answer}: it is not step 4's server. "
        "Start it with: python stream_server_sse.py\n",
    )


def test_the_url_is_the_servers_base_url(serve, pauses, capsys):
    url = serve(server.app)
    assert sse_client.main(["--url", url + "/", "--count", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("end: end of stream")
    assert sse_client.main(["--url", url + "/events/User1"]) == 1
    assert capsys.readouterr() == (
        "",
        "error: --url takes the server's http(s) base URL such as http://127.0.0.1:5000, "
        f"not {url}/events/User1\n",
    )


# follow(): when to reconnect, how long to wait, when to give up


@pytest.fixture
def scripted(serve, monkeypatch):
    """scripted(*bodies) serves one body per connection, in turn, as a text/event-stream,
    and gives its URL and the Last-Event-ID of each request; the client's waits between
    connections are recorded in `waits` instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(sse_client, "time", SimpleNamespace(sleep=waits.append, monotonic=None))

    def start(*bodies: str) -> tuple[str, list]:
        app, left, seen = Flask("scripted"), list(bodies), []

        @app.get("/events")
        def events():
            """The next body in the script, whole; then the connection closes."""
            seen.append(request.headers.get("Last-Event-ID"))
            assert request.headers["Accept"] == "text/event-stream"  # what it asks for
            return Response(left.pop(0), mimetype="text/event-stream")

        return f"{serve(app)}/events", seen

    start.waits = waits
    return start


def test_follow_gives_up_after_five_reconnections_that_bring_nothing(scripted, capsys):
    url, seen = scripted("id: 1\ndata: one\n\n", *[""] * 5)
    events = sse_client.follow(url, {})
    assert next(events) == Event("message", "one", "1")
    with pytest.raises(sse_client.StreamError) as raised:
        next(events)
    assert str(raised.value) == (
        "the server closed the stream before its end, and 5 reconnections failed"
    )
    assert seen == [None, *["1"] * 5]  # the first try and five more, each resuming after 1
    assert scripted.waits == [2.0] * 5  # before each of those five; no `retry:` came: 2 s
    out = capsys.readouterr().out
    assert "(the server closed the stream before its end; resuming after event 1 in 2s)" in out


def test_follow_counts_only_failures_in_a_row(scripted):
    # Each connection brings one event and then closes: never five failures in a row.
    bodies = [f"id: {n}\ndata: {n}\n\n" for n in range(1, 9)] + ["event: end\ndata: done\n\n"]
    url, seen = scripted(*bodies)
    events = list(sse_client.follow(url, {}))
    assert [event.data for event in events] == [*map(str, range(1, 9)), "done"]
    assert seen == [None, *map(str, range(1, 9))]


def test_follow_waits_as_long_as_the_server_asks(scripted):
    url, _ = scripted("retry: 150\nid: 1\ndata: one\n\n", "event: end\ndata: done\n\n")
    assert [event.data for event in sse_client.follow(url, {})] == ["one", "done"]
    assert scripted.waits == [0.15]


def test_follow_reconnects_when_the_server_falls_silent(serve, monkeypatch):
    # READ_TIMEOUT (70 s, longer than any pause the server makes) ends a read that waits
    # longer: a server or a network that hangs without closing is a lost connection.
    monkeypatch.setattr(sse_client, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(sse_client, "time", SimpleNamespace(sleep=lambda seconds: None))
    released, seen, outwaited = threading.Event(), [], threading.Event()
    app = Flask("silent")

    @app.get("/events")
    def events():
        """One event, then silence until the test ends; the next connection gets `end`."""
        seen.append(request.headers.get("Last-Event-ID"))

        def silent():
            yield "id: 1\ndata: one\n\n"
            if not released.wait(WAIT):  # the client waited on: the server ends it instead
                outwaited.set()

        body = silent() if len(seen) == 1 else iter(["event: end\ndata: done\n\n"])
        return Response(body, mimetype="text/event-stream")

    try:
        events = list(sse_client.follow(f"{serve(app)}/events", {}))
    finally:
        released.set()
    assert [event.data for event in events] == ["one", "done"]
    assert seen == [None, "1"]
    assert not outwaited.is_set(), "the client never let the silent connection go"


def test_follow_gives_up_as_well_when_no_connection_ever_brought_an_event(scripted, capsys):
    url, seen = scripted(*[""] * 6)
    with pytest.raises(sse_client.StreamError, match="5 reconnections failed"):
        list(sse_client.follow(url, {}))
    assert seen == [None] * 6  # the first try and five more, from the start each time
    said = "(the server closed the stream before its end; resuming after event none in 2s)"
    assert capsys.readouterr().out.splitlines() == [said] * 5


def test_the_help_says_what_the_client_does(capsys):
    with pytest.raises(SystemExit) as raised:
        sse_client.main(["--help"])
    assert raised.value.code == 0
    assert "\nPrint Server-Sent Events as they arrive.\n" in capsys.readouterr().out


def test_the_clients_defaults_and_help(serve, monkeypatch, capsys):
    asked = []
    app = Flask("recorder")

    @app.get("/<path:path>")
    def anything(path):
        """Say what was asked for, and end at once."""
        asked.append((path, dict(request.args)))
        return Response("event: end\ndata: done\n\n", mimetype="text/event-stream")

    url = serve(app)
    assert sse_client.main(["--url", url]) == 0
    assert sse_client.main(["--url", url, "--tokens"]) == 0
    assert asked == [
        ("events/User1", {"count": "10", "interval": "1.0"}),
        ("tokens", {"interval": "0.15"}),
    ]
    for option, value in [("--count", "2.5"), ("--interval", "soon")]:  # refused at once
        with pytest.raises(SystemExit) as raised:
            sse_client.main(["--url", url, option, value])
        assert raised.value.code == 2
    assert len(asked) == 2  # no request for those
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        sse_client.main(["--help"])
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for line in [
        "user whose feed to follow",
        f"--url URL server URL (default: {sse_client.DEFAULT_URL})",
        "--count COUNT events to ask for",
        "--interval INTERVAL seconds between events",
        "--tokens stream a text word by word",
    ]:
        assert line in lines


@pytest.mark.parametrize(
    "argv", [["--count", "2", "--interval", "1"], ["--tokens"]], ids=["events", "tokens"]
)
def test_the_client_shows_each_event_while_the_stream_goes_on(serve, gated, argv):
    # Into a pipe, as much as to a terminal: print() would otherwise hold the text back in
    # its buffer until the stream ends.
    command = [sys.executable, "stream_client_sse.py", "--url", serve(server.app), *argv]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as for a user
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE) as client:
        try:
            gated.wait_for_pause()  # the first event is out; the next waits at the gate
            assert select.select([client.stdout], [], [], WAIT)[0], "nothing shown meanwhile"
            assert os.read(client.stdout.fileno(), 1024)
        finally:
            gated.open()
            client.wait(WAIT)
