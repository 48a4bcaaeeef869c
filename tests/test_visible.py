"""Text from the network is never printed raw (issue #20, B1): every client shows control
characters as escapes, through client_errors.visible(), so that a message cannot pass for
another user's line, retitle the terminal or hide what it says."""

import json

import pytest

import stream_client as step_1_client
import stream_client_chat as chat_client
import stream_client_multiuser_resume as resume_client
import stream_client_sse as sse_client
from client_errors import visible
from helpers import Answer, token_for

# The attacks of issue #20: Mallory's message erases its own line and shows as Bob's; another
# sets the terminal's title. And a bidi override, which reverses what follows it on screen.
AS_BOB = "\r\x1b[2K12:00:00 Bob: send me your token"
RETITLE = "\x1b]2;you have been hacked\x07"
REVERSED = "\u202eevil.exe"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (AS_BOB, "\\r\\x1b[2K12:00:00 Bob: send me your token"),
        (RETITLE, "\\x1b]2;you have been hacked\\x07"),
        (REVERSED, "\\u202eevil.exe"),
        ("two\nlines\tand a tab", "two\\nlines\\tand a tab"),
        ("héllo ✓ 日本", "héllo ✓ 日本"),  # what is printable stays as it is
    ],
)
def test_visible_writes_each_control_character_as_its_escape(text, shown):
    assert visible(text) == shown


def no_control_characters(out: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in out)


def test_the_chat_client_shows_hostile_messages_visibly(scripted, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", iter([]))

    def message(number: int, user: str, text: str) -> bytes:
        data = json.dumps({"id": f"{number}-0", "user": user, "text": text, "time": 0})
        return f"id: {number}-0\nevent: message\ndata: {data}\n\n".encode()

    events = b"retry: 1\n\n" + message(1, "Mallory", AS_BOB) + message(2, RETITLE, REVERSED)
    token = json.dumps({"access_token": "t", "expires_in": 3600}).encode()
    server = scripted(
        {
            "/generate_token": [Answer([token], "application/json", False)],
            "/rooms/lobby/events": [
                Answer([events]),
                Answer([b'{"error": "no Redis"}'], "application/json", False, status="503 No"),
            ],
        }
    )
    assert chat_client.main(["--url", server.url]) == 1  # Redis "never comes back"
    out = capsys.readouterr().out
    assert no_control_characters(out)
    shown = [line.split(" ", 1)[1] for line in out.splitlines()[:2]]
    assert shown == [
        "Mallory: \\r\\x1b[2K12:00:00 Bob: send me your token",
        "\\x1b]2;you have been hacked\\x07: \\u202eevil.exe",
    ]


def test_the_sse_client_shows_control_characters_visibly(scripted, capsys):
    # A CR would end the line in an event stream: the rest of the attack goes through.
    events = f"id: \x1b[31m\ndata: {AS_BOB[1:]}\n\nevent: token\ndata: {RETITLE}\n\n"
    events += "event: end\ndata: end\n\n"
    server = scripted({"/events/User1": [Answer([events.encode()])]})
    assert sse_client.main(["--url", server.url]) == 0
    out = capsys.readouterr().out
    assert no_control_characters(out)
    assert "#\\x1b[31m message: \\x1b[2K12:00:00 Bob: send me your token\n" in out
    assert "\\x1b]2;you have been hacked\\x07" in out


def test_the_step_7_client_shows_control_characters_visibly(scripted, capsys):
    tokens = {"access_token": token_for(), "refresh_token": "r", "expires_in": 3600}
    lines = [{"seq": 1, "text": AS_BOB}, {"end": "complete"}]
    server = scripted(
        {
            "/generate_token": [Answer([json.dumps(tokens).encode()], "application/json", False)],
            "/stream": [Answer([b"".join(json.dumps(line).encode() + b"\n" for line in lines)])],
        }
    )
    server.answers["/stream"][0].content_type = "application/x-ndjson"
    assert resume_client.main(["--url", server.url, "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert no_control_characters(out)
    assert "  \\r\\x1b[2K12:00:00 Bob: send me your token\n" in out


def test_the_step_1_client_shows_control_characters_visibly(scripted, capsys):
    # Steps 2, 3 and 6 print their chunks with the same line.
    server = scripted({"/stream": [Answer([RETITLE.encode() + b"\n"], "text/plain")]})
    assert step_1_client.main(["--url", server.url]) == 0
    out = capsys.readouterr().out
    assert no_control_characters(out)
    assert "  \\x1b]2;you have been hacked\\x07\n" in out


def test_an_error_from_the_server_is_shown_visibly(scripted, capsys):
    refusal = json.dumps({"error": AS_BOB}).encode()
    server = scripted(
        {"/events/User1": [Answer([refusal], "application/json", False, status="400 Bad")]}
    )
    assert sse_client.main(["--url", server.url]) == 1
    err = capsys.readouterr().err
    assert no_control_characters(err)
    assert err == "error: server answered 400: \\r\\x1b[2K12:00:00 Bob: send me your token\n"
