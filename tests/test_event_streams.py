"""Event streams read by the HTML standard's rules, by every reader in the project: step 4's
SSEParser (which the chat client imports) and static/eventstream.js (which the pages import).

- The web-platform-tests' own vectors (eventsource/format-*), fed whole, cut at every byte and
  one byte at a time, to both parsers; the table itself checked against Chromium's EventSource.
- A differential test: the same bytes, from a server on a bare socket, cut in the middle of an
  event, go to headless Chromium's EventSource, to the Python clients and to the chat page;
  all must show the same events and send the same Last-Event-ID when they reconnect.
- Step 7's NDJSON client, which reads a line only whole.
"""

import codecs
import itertools
import json
import threading
from contextlib import closing
from dataclasses import dataclass

import pytest
import requests
from selenium.webdriver.common.by import By

import stream_client_chat as chat_client
import stream_client_multiuser_resume as resume_client
import stream_client_sse as sse_client
import stream_server_chat as chat_server
import stream_server_sse as sse_server
from helpers import ROOT, WAIT, Answer, port_of, token_for, wait_in_page
from stream_client_sse import Event, SSEParser


@dataclass
class Vector:
    """A WPT test's stream, and what EventSource must make of it."""

    name: str  # the file in web-platform-tests' eventsource/ folder it comes from
    connections: list[bytes]  # the body of each connection, in turn (the server's answers)
    events: list[tuple[str, str, str]]  # each event's type, data and lastEventId
    last_ids: list[str]  # after each connection: the Last-Event-ID the next one sends
    retry: int | None = None  # the reconnection time the stream set, in ms


# Their resources answer `message` followed by two newlines (none with newline=none) and one
# more (resources/message.py); last-event-id.py answers "data: <Last-Event-ID>" to a
# reconnection, else "id: <idvalue, … by default>", "retry: 200" and "data: hello".
LONG = b"x" * 2048
HELLO = b"\nretry: 200\ndata: hello\n\n"
VECTORS = [
    Vector(
        "format-bom.js",
        [b"\xef\xbb\xbfdata:1\n\n\xef\xbb\xbfdata:2\n\ndata:3\n\n\n"],
        [("message", "1", ""), ("message", "3", "")],  # a second BOM is no BOM: "\ufeffdata"
        [""],
    ),
    Vector(
        "format-comments.js",
        [b"data:1\r:\0\n:\r\ndata:2\n:%s\rdata:3\n:data:fail\r:%s\ndata:4\n\n" % (LONG, LONG)],
        [("message", "1\n2\n3\n4", "")],
        [""],
    ),
    Vector(
        "format-data-before-final-empty-line.js",
        [b"retry:1000\ndata:test1\n\nid:test\ndata:test2\n"],
        [("message", "test1", "")],  # the last event never ended: neither it nor its id counts
        [""],
        retry=1000,
    ),
    Vector(
        "format-field-data.js",
        [b"data:\n\ndata\ndata\n\ndata:test\n\n\n"],
        [("message", "", ""), ("message", "\n", ""), ("message", "test", "")],
        [""],
    ),
    Vector(
        "format-field-event.htm",
        [b"event:test\ndata:x\n\ndata:x\n\n\n"],
        [("test", "x", ""), ("message", "x", "")],
        [""],
    ),
    Vector(
        "format-field-id.htm",
        [b"id: \xe2\x80\xa6" + HELLO, b"data: \xe2\x80\xa6\n\n"],
        [("message", "hello", "…"), ("message", "…", "…")],  # the id outlives its connection
        ["…", "…"],
        retry=200,
    ),
    Vector(
        "format-field-id-2.any.js",
        [b"id: \xe2\x80\xa6" + HELLO, b"data: \xe2\x80\xa6\n\n", b"data: \xe2\x80\xa6\n\n"],
        [("message", "hello", "…"), ("message", "…", "…"), ("message", "…", "…")],
        ["…", "…", "…"],
        retry=200,
    ),
    Vector(
        "format-field-id-3.htm (persists)",
        [b"id: 1\ndata: 1\n\ndata:2\n\n"],
        [("message", "1", "1"), ("message", "2", "1")],
        ["1"],
    ),
    Vector(
        "format-field-id-3.htm (changes and persists)",
        [b"id: 1\ndata: 1\n\nid: 2\ndata:2\n\ndata:3\n\n"],
        [("message", "1", "1"), ("message", "2", "2"), ("message", "3", "2")],
        ["2"],
    ),
    Vector(
        "format-field-id-3.htm (resets)",
        [b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n"],
        [("message", "1", "1"), ("message", "2", ""), ("message", "3", "")],
        [""],
    ),
    *[  # an id with U+0000 in it is ignored, so the reconnection sends none
        Vector(
            f"format-field-id-null ({value!r})",
            [b"id: " + value + HELLO, b"id: " + value + HELLO],
            [("message", "hello", ""), ("message", "hello", "")],
            ["", ""],
            retry=200,
        )
        for value in (b"\0\0", b"x\0", b"\0x", b"x\0x", b" \0")
    ],
    Vector(
        "format-field-retry.htm",
        [b"retry:02000\ndata:x\n\n\n"],
        [("message", "x", "")],
        [""],
        retry=2000,  # a leading zero is not octal
    ),
    Vector(
        "format-field-retry-bogus.htm",
        [b"retry:2000\nretry:1000x\ndata:x\n\n\n"],
        [("message", "x", "")],
        [""],
        retry=2000,  # "1000x" is not a number: ignored
    ),
    Vector("format-null-character.html", [b"data:\0\n\n\n\n\n"], [("message", "\0", "")], [""]),
    # Served as charset=windows-1252: an event stream is UTF-8 all the same (the test of the
    # header itself is test_the_python_client_reads_utf_8_whatever_the_charset, below).
    Vector("format-utf-8.any.js", [b"data:ok\xe2\x80\xa6\n\n\n"], [("message", "ok…", "")], [""]),
    # Not WPT's: issue #20's own cases. A line cut by a drop is not glued to the next
    # connection's first line, and an event cut off is not seen, nor is its id.
    Vector(
        "issue 20: a cut line",
        [b"id: 1\ndata: one\n\ndata: thr", b"retry: 100\ndata: three\n\n"],
        [("message", "one", "1"), ("message", "three", "1")],
        ["1", "1"],
        retry=100,
    ),
    Vector(
        "issue 20: a cut event",
        [b"id: 6\ndata: six\n\nid: 7\ndata: seven\n", b"data: seven again\n\n"],
        [("message", "six", "6"), ("message", "seven again", "6")],
        ["6", "6"],
    ),
    Vector(
        "issue 20: UTF-8 cut anywhere; CR line ends, the last one last of all",
        [b"\xef\xbb\xbfdata: h\xc3\xa9llo \xe2\x9c\x93\r\rdata: a\r\ndata: b\r\r"],
        [("message", "héllo ✓", ""), ("message", "a\nb", "")],
        [""],
    ),
]
IDS = [vector.name for vector in VECTORS]


def whole(body: bytes) -> list[bytes]:
    return [body]


def cut_at(at: int):
    return lambda body: [body[:at], body[at:]]


def byte_by_byte(body: bytes) -> list[bytes]:
    return [body[n : n + 1] for n in range(len(body))]


def read_with_python(vector: Vector, pieces_of) -> tuple[list[tuple], list[str], int | None]:
    """What step 4's client makes of the vector's connections, each cut by pieces_of."""
    parser, events, last_ids = SSEParser(), [], []
    for body in vector.connections:
        if last_ids:  # a reconnection: what follow() does before each connection
            parser.reset()
        # What requests does with response.encoding = "utf-8-sig", as the client sets it.
        decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        for piece in pieces_of(body):
            events += parser.feed(decoder.decode(piece))
        events += parser.feed(decoder.decode(b"", final=True))
        last_ids.append(parser.last_id)
    return [tuple(event) for event in events], last_ids, parser.retry_ms


@pytest.mark.parametrize("vector", VECTORS, ids=IDS)
def test_the_python_parser_reads_each_wpt_vector_whole_and_cut_at_every_byte(vector):
    expected = (vector.events, vector.last_ids, vector.retry)
    assert read_with_python(vector, whole) == expected
    assert read_with_python(vector, byte_by_byte) == expected
    longest = max(map(len, vector.connections))
    for at in range(1, longest):
        assert read_with_python(vector, cut_at(at)) == expected, f"cut at byte {at}"


# The same vectors through static/eventstream.js, in Chromium: TextDecoder, as the pages'
# TextDecoderStream, decodes UTF-8 and drops a leading BOM.
IN_THE_PAGE = """
const [vectors, done] = arguments;
import("/static/eventstream.js").then(({ EventStreamParser }) => {
  const read = (connections, piecesOf) => {
    const events = [], lastIds = [];
    const parser = new EventStreamParser((e) => events.push([e.type, e.data, e.lastEventId]));
    for (const body of connections) {
      parser.reset();
      const decoder = new TextDecoder();
      for (const piece of piecesOf(new Uint8Array(body))) {
        parser.feed(decoder.decode(piece, { stream: true }));
      }
      parser.feed(decoder.decode());
      lastIds.push(parser.lastEventId);
    }
    return JSON.stringify([events, lastIds, parser.retry]);
  };
  done(vectors.map((connections) => {
    const longest = Math.max(...connections.map((body) => body.length));
    const expected = read(connections, (body) => [body]);
    const differ = [];
    const bytes = (body) => Array.from(body, (_, n) => body.slice(n, n + 1));
    if (read(connections, bytes) !== expected) {
      differ.push("byte by byte");
    }
    for (let at = 1; at < longest; at++) {
      if (read(connections, (body) => [body.slice(0, at), body.slice(at)]) !== expected) {
        differ.push(`cut at byte ${at}`);
      }
    }
    return [JSON.parse(expected), differ];
  }));
}).catch((error) => done(String(error)));
"""


def test_the_pages_parser_reads_each_wpt_vector_whole_and_cut_at_every_byte(browser, serve):
    browser.get(serve(sse_server.app))
    vectors = [[list(body) for body in vector.connections] for vector in VECTORS]
    results = browser.execute_async_script(IN_THE_PAGE, vectors)
    assert isinstance(results, list), results
    for vector, (got, differ) in zip(VECTORS, results, strict=True):
        events, last_ids, retry = [tuple(event) for event in got[0]], got[1], got[2]
        expected = (vector.events, vector.last_ids, vector.retry)
        assert (events, last_ids, retry) == expected, vector.name
        assert differ == [], vector.name


# The table itself checked against the reference: each vector's connections, in turn, to
# Chromium's EventSource. A 204 after the last one stops it, and its request shows the
# Last-Event-ID the vector ends with.
ALL_VECTORS_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script>
window.seen = {}; window.ended = {};
for (const [path, types] of %s) {
  seen[path] = [];
  const source = new EventSource(path);
  for (const type of types) {
    source.addEventListener(type, (e) => seen[path].push([e.type, e.data, e.lastEventId]));
  }
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) ended[path] = true; };
}
</script>"""


def test_chromium_sees_in_each_wpt_vector_what_the_table_says(browser, scripted):
    paths = [f"/vector/{n}" for n in range(len(VECTORS))]
    types = [
        [path, sorted({"message", *(event[0] for event in vector.events)})]
        for path, vector in zip(paths, VECTORS, strict=True)
    ]
    page = (ALL_VECTORS_PAGE % json.dumps(types)).encode()
    no_more = Answer([], chunked=False, status="204 No Content")
    server = scripted(
        {
            "/": [Answer([page], "text/html", False)],
            **{
                path: [*(Answer([body]) for body in vector.connections), no_more]
                for path, vector in zip(paths, VECTORS, strict=True)
            },
        }
    )
    browser.get(server.url)
    ended = lambda: len(browser.execute_script("return ended"))  # noqa: E731
    wait_in_page(browser, lambda: ended() == len(paths), "every vector's EventSource closed")
    seen = browser.execute_script("return seen")
    for path, vector in zip(paths, VECTORS, strict=True):
        assert [tuple(event) for event in seen[path]] == vector.events, vector.name
        sent = [request.get(b"last-event-id", b"").decode() for request in server.requests[path]]
        assert sent[1:] == vector.last_ids, vector.name


JAVASCRIPT = ("text/javascript", "application/javascript")  # a module script needs one of them


@pytest.mark.parametrize("app", [sse_server.app, chat_server.app], ids=["step 4", "step 8"])
def test_every_server_of_a_page_serves_the_shared_parser_behind_nginx_too(app, serve, nginx):
    for base in (url := serve(app), nginx(port_of(url)).url):
        response = requests.get(f"{base}/static/eventstream.js", timeout=WAIT)
        assert response.status_code == 200
        assert response.headers["Content-Type"].split(";")[0] in JAVASCRIPT
        assert "export class EventStreamParser" in response.text


# The differential test: the same bytes to Chromium's EventSource, the reference, and to the
# Python client; then to the chat page and the chat client. A server on a bare socket sends
# them as no framework would.

CUT_MID_EVENT = [
    # No charset named (requests would read Latin-1); a BOM; a character and a CRLF each cut
    # across two pieces; a non-ASCII id; then a drop in the middle of event 4, whose id must
    # not count.
    Answer(
        [
            b"\xef\xbb\xbfretry: 50\n\nid: 1\nevent: chunk\ndata: h\xc3",
            b"\xa9llo \xe2\x9c\x93\n\ndata: three\r",
            b"\nid: 3\r\rid: \xe2\x80\xa6\ndata: two\n\n",
            b"id: 4\ndata: fo",
        ],
        complete=False,
    ),
    # The body ends properly, but in the middle of an event. (Chromium refuses a charset
    # other than UTF-8, unlike WPT's format-utf-8: the Python client's test is below.)
    Answer(
        [b"retry: 50\ndata: after the drop\n\n", b"event: chunk\ndata: five\nid: 5\n\nid: 6\nda"],
        "text/event-stream; charset=utf-8",
    ),
    Answer([b"data: \xe2\x80\xa6 the end\n\nevent: end\ndata: bye\n\n"]),
]
SEEN = [
    ("chunk", "héllo ✓", "1"),
    ("message", "three", "3"),
    ("message", "two", "…"),
    ("message", "after the drop", "…"),
    ("chunk", "five", "5"),
    ("message", "… the end", "5"),
    ("end", "bye", "5"),
]
RESUMED_AFTER = [None, "…".encode(), b"5"]  # each connection's Last-Event-ID, as bytes
EVENT_SOURCE_PAGE = b"""<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script>
window.seen = [];
const source = new EventSource("/browser");
for (const type of ["message", "chunk", "end"]) {
  source.addEventListener(type, (e) => {
    seen.push([e.type, e.data, e.lastEventId]);
    if (type === "end") source.close();
  });
}
</script>"""


def last_event_ids(server, path: str) -> list[bytes | None]:
    return [request.get(b"last-event-id") for request in server.requests[path]]


def test_chromium_and_the_python_client_see_the_same_events_and_resume_alike(
    browser, scripted, capsys
):
    page = Answer([EVENT_SOURCE_PAGE], "text/html; charset=utf-8", chunked=False)
    server = scripted({"/": [page], "/browser": CUT_MID_EVENT, "/python": CUT_MID_EVENT})
    browser.get(server.url)
    seen = lambda: [tuple(event) for event in browser.execute_script("return seen")]  # noqa: E731
    wait_in_page(browser, lambda: len(seen()) == len(SEEN), f"{len(SEEN)} events")
    assert seen() == SEEN
    assert last_event_ids(server, "/browser") == RESUMED_AFTER

    events = list(sse_client.follow(f"{server.url}/python", {}))
    assert [tuple(event) for event in events] == SEEN
    assert last_event_ids(server, "/python") == RESUMED_AFTER
    assert capsys.readouterr().out.splitlines() == [
        "(the connection was lost; resuming after event … in 0.05s)",
        "(the server closed the stream before its end; resuming after event 5 in 0.05s)",
    ]


def test_a_reconnection_sends_the_id_of_the_last_whole_event_and_glues_nothing(scripted):
    """Issue #20's A1 and A2 in plain ASCII: after a drop in the middle of event 7, the Python
    client resumes after 6, and the cut line is not glued to the next connection's first."""
    server = scripted(
        {
            "/stream": [
                Answer([b"retry: 10\n\nid: 6\ndata: six\n\nid: 7\ndata: thr"], complete=False),
                Answer([b"retry: 10\nid: 7\ndata: three\n\nevent: end\ndata: end\n\n"]),
            ]
        }
    )
    events = list(sse_client.follow(f"{server.url}/stream", {}))
    assert events == [
        Event("message", "six", "6"),
        Event("message", "three", "7"),
        Event("end", "end", "7"),
    ]
    assert last_event_ids(server, "/stream") == [None, b"6"]


def chat_event(message_id: str, text: str) -> bytes:
    data = {"id": message_id, "user": "Bob", "text": text, "time": 0}
    data = json.dumps(data, ensure_ascii=False)
    return f"id: {message_id}\nevent: message\ndata: {data}\n\n".encode()


FIRST = chat_event("1-…", "héllo ✓")  # not an id the server makes: a header in UTF-8
CUT = FIRST.index("é".encode()) + 1  # between the two bytes of é


def room(dropped: threading.Event) -> list[Answer]:
    """The room's stream, connection by connection; the first drops once `dropped` is set."""
    return [
        # As above: a BOM, a character cut in two, a drop in the middle of an event (2-0).
        Answer(
            [b"\xef\xbb\xbfretry: 50\n\n" + FIRST[:CUT], FIRST[CUT:] + chat_event("2-0", "2")[:-4]],
            complete=False,
            hold=dropped,
        ),
        Answer([b"retry: 50\n\n" + chat_event("2-0", "2") + chat_event("3-0", "three")[:-1]]),
        Answer([chat_event("3-0", "three")], "text/event-stream; charset=utf-8"),
        Answer([b'{"error": "no Redis"}\n'], "application/json", False, status="503 Unavailable"),
    ]


def chat_routes(dropped: threading.Event) -> dict[str, list[Answer]]:
    """What the chat page needs from a server, and the room's scripted stream."""
    static = ROOT / "static"
    token = Answer([b'{"access_token": "t", "expires_in": 3600}'], "application/json", False)
    return {
        "/": [Answer([(static / "chat.html").read_bytes()], "text/html", False)],
        "/static/eventstream.js": [
            Answer([(static / "eventstream.js").read_bytes()], "text/javascript", False)
        ],
        "/generate_token": [token],
        "/rooms/lobby/presence": [Answer([b'{"users": {}}'], "application/json", False)],
        "/rooms/lobby/events": room(dropped),
    }


def test_the_chat_page_and_client_see_the_same_messages_and_resume_alike(browser, scripted):
    expected = [("1-…", "héllo ✓"), ("2-0", "2"), ("3-0", "three")]
    resumed_after = [None, "1-…".encode(), b"2-0"]

    dropped = threading.Event()
    server = scripted(chat_routes(dropped))
    browser.get(f"{server.url}/?room=lobby&user=Alice")
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#messages li[data-id]")  # noqa: E731
    wait_in_page(browser, lambda: len(rows()) == 1, "the first message")
    dropped.set()
    wait_in_page(browser, lambda: len(rows()) == 3, "3 messages")
    text = lambda row: row.find_element(By.CLASS_NAME, "text").text  # noqa: E731
    assert [(row.get_attribute("data-id"), text(row)) for row in rows()] == expected
    assert last_event_ids(server, "/rooms/lobby/events")[:3] == resumed_after

    server = scripted(chat_routes(dropped))  # set already: this drop comes at once
    with closing(chat_client.follow(server.url, "lobby", "Alice")) as events:
        messages = [json.loads(event.data) for event in itertools.islice(events, 3)]
    assert [(message["id"], message["text"]) for message in messages] == expected
    assert last_event_ids(server, "/rooms/lobby/events") == resumed_after


# WPT's format-utf-8 and format-mime-valid-bogus, about the response's header: through the
# Python client and the step 4 page, from a server on a bare socket.

UTF_8_AS_WINDOWS_1252 = Answer(
    [b"data:ok\xe2\x80\xa6\n\nevent: end\ndata: end\n\n"], "text/event-stream; charset=windows-1252"
)
BOGUS = Answer([b"data: data\n\n\n"], "text/x-bogus")


def test_the_python_client_reads_utf_8_whatever_the_charset(scripted, capsys):
    server = scripted({"/events/User1": [UTF_8_AS_WINDOWS_1252]})
    assert sse_client.main(["--url", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("  ", 1)[1] for line in out] == ["# message: ok…", "end: end"]


def test_the_python_client_reads_nothing_but_an_event_stream(scripted, capsys):
    server = scripted({"/events/User1": [BOGUS]})
    assert sse_client.main(["--url", server.url]) == 1
    assert capsys.readouterr().err == (
        f"error: {server.url}/events/User1 answered 200 text/x-bogus: it is not step 4's "
        "server. Start it with: python stream_server_sse.py\n"
    )
    assert len(server.requests["/events/User1"]) == 1  # and it does not try again


def tokens_page(tokens: Answer):
    static = ROOT / "static"
    return {
        "/": [Answer([(static / "sse.html").read_bytes()], "text/html", False)],
        "/static/eventstream.js": [
            Answer([(static / "eventstream.js").read_bytes()], "text/javascript", False)
        ],
        "/tokens": [tokens],
    }


def test_the_step_4_page_reads_tokens_by_the_same_rules(browser, scripted):
    words = "h\u00e9llo \u2713 ok\u2026".encode()
    tokens = Answer(
        [
            b"\xef\xbb\xbfretry: 50\r\rid: 1\revent: token\rdata: " + words[:2],
            words[2:] + b"\r",
            b"\n\r\n: a comment\n\nevent: end\ndata: end\n\n",
        ],
        "text/event-stream; charset=windows-1252",
    )
    server = scripted(tokens_page(tokens))
    browser.get(server.url)
    browser.find_element(By.ID, "tokens-start").click()
    status = lambda: browser.find_element(By.ID, "tokens-status").text  # noqa: E731
    wait_in_page(browser, lambda: status().startswith("done"), "the end")
    assert browser.find_element(By.ID, "tokens-text").text == "héllo ✓ ok…"
    assert status().startswith("done: 1 tokens")


def test_the_step_4_page_reads_nothing_but_an_event_stream(browser, scripted):
    server = scripted(tokens_page(BOGUS))
    browser.get(server.url)
    browser.find_element(By.ID, "tokens-start").click()
    status = lambda: browser.find_element(By.ID, "tokens-status").text  # noqa: E731
    wait_in_page(browser, lambda: status().startswith("error"), "an error")
    assert status() == "error: not an event stream: text/x-bogus"
    assert browser.find_element(By.ID, "tokens-text").text == ""


# Step 7's NDJSON: a line is read only whole. One cut off by the end of the body, or by a
# drop, is not parsed, and the client resumes from it.


NDJSON = "application/x-ndjson"


def ndjson(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.mark.parametrize("dropped", [False, True], ids=["body ended", "connection dropped"])
def test_the_step_7_client_resumes_from_a_line_cut_in_two(scripted, monkeypatch, capsys, dropped):
    monkeypatch.setattr(resume_client, "FIRST_WAIT", 0.01)
    first, second = {"seq": 1, "text": "line 1"}, {"seq": 2, "text": "line 2"}
    tokens = {"access_token": token_for(), "refresh_token": "r", "expires_in": 3600}
    server = scripted(
        {
            "/generate_token": [Answer([json.dumps(tokens).encode()], "application/json", False)],
            "/stream": [
                Answer([ndjson(first) + ndjson(second)[:-5]], NDJSON, complete=not dropped),
                Answer([ndjson(second, {"end": "complete"})], NDJSON),
            ],
        }
    )
    assert resume_client.main(["--url", server.url, "--count", "2"]) == 0
    out = [line.split("  ", 1)[-1] for line in capsys.readouterr().out.splitlines()[2:]]
    why = "the connection was lost" if dropped else "the stream stopped in the middle of a line"
    assert out[:3] == ["line 1", f"({why}: resuming from line 2 in 0.01s)", "line 2"]
    targets = [request[b":target"] for request in server.requests["/stream"]]
    assert [target.split(b"from=")[1] for target in targets] == [b"1", b"2"]
