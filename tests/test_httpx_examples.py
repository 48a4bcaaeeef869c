"""The httpx snippets of docs/serving.md (examples/), run as a reader runs them, against the real
servers."""

import subprocess
import sys

import pytest

import stream_server_multiuser
import stream_server_sse
from helpers import ROOT, WAIT

LINES = [f"chunk {n} of 3 for User{u}\n" for u in (1, 2, 3) for n in (1, 2, 3)]


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    for step in (stream_server_multiuser, stream_server_sse):
        monkeypatch.setattr(step, "sleep", lambda seconds: None)


def run(example: str, url: str) -> str:
    command = [sys.executable, f"examples/{example}", url]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sync_httpx_reads_the_chunked_stream(serve):
    output = run("httpx_stream.py", serve(stream_server_multiuser.app))
    assert output == "".join(LINES[:3])


def test_async_httpx_reads_three_streams_at_once(serve):
    output = run("httpx_stream_async.py", serve(stream_server_multiuser.app))
    assert sorted(output.splitlines(keepends=True)) == sorted(LINES)


def test_httpx_sse_reads_the_events(serve):
    output = run("httpx_sse_events.py", serve(stream_server_sse.app))
    assert output.splitlines() == [
        "chunk 1: chunk 1 of 3 for User1",
        "chunk 2: chunk 2 of 3 for User1",
        "chunk 3: chunk 3 of 3 for User1",
        "end 3: end of stream",
    ]


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_a_page_shows_each_example_as_it_is(example):
    code = (ROOT / "examples" / example).read_text()
    body = code.split('"""\n\n', 2)[-1]  # the code after the module docstring
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown = [page.name for page in pages if body in page.read_text()]
    assert shown, f"neither README.md nor a page in docs/ shows {example} as it is"
