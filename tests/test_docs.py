"""The pages stay true to the code: every excerpt marked `<!-- from: FILE -->` is a run of FILE's
lines as they are, every diff marked `<!-- diff: BASE STEP -->` holds lines of those files, every
relative link and anchor leads somewhere, every `python script.py --flag` a page asks for is a
script that takes that flag, and every screenshot in docs/ is one that a test makes."""

import importlib
import re
import shlex
import subprocess
import sys
from functools import cache

import pytest

from helpers import ROOT, TEST_KEY, WAIT

# The README, one page per step, and the serving, benchmark and tests pages.
PAGES = sorted(
    path.relative_to(ROOT).as_posix()
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("*/README.md")]
)
FENCE = re.compile(r"^(\s*)(`{3,})(\S*)\s*$")
MARKER = re.compile(r"^\s*<!-- (from|diff): ([^>]*?) -->\s*$")


def blocks(page: str) -> list[tuple[int, str, list[str], str | None]]:
    """The page's fenced blocks: (line number of the fence, language, lines with the fence's
    indentation taken off, the marker on the line above or None)."""
    lines = (ROOT / page).read_text().splitlines()
    found, number = [], 0
    while number < len(lines):
        if match := FENCE.match(lines[number]):
            indent, fence, language = match.groups()
            end = number + 1
            while end < len(lines) and lines[end].strip() != fence:
                end += 1
            body = [line.removeprefix(indent) for line in lines[number + 1 : end]]
            above = lines[number - 1] if number else ""
            found.append((number + 1, language, body, above if MARKER.match(above) else None))
            number = end
        number += 1
    return found


def prose(page: str) -> str:
    """The page without its fenced blocks and inline code, where links are written."""
    text = (ROOT / page).read_text()
    text = re.sub(r"^(\s*)(`{3,}).*?^\1\2\s*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def excerpts(kind: str) -> list:
    return [
        pytest.param(page, line, body, MARKER.match(marker).group(2), id=f"{page}:{line}")
        for page in PAGES
        for line, _, body, marker in blocks(page)
        if marker and MARKER.match(marker).group(1) == kind
    ]


def file_lines(name: str) -> list[str]:
    path = ROOT / name
    assert path.is_file(), f"{name}: no such file"
    return path.read_text().splitlines()


@pytest.mark.parametrize(("page", "line", "body", "source"), excerpts("from"))
def test_each_excerpt_is_a_run_of_its_files_lines(page, line, body, source):
    lines = file_lines(source)
    starts = [i for i in range(len(lines) - len(body) + 1) if lines[i : i + len(body)] == body]
    assert body and starts, (
        f"{page}:{line}: this block is not a run of {source}'s lines as they are now; the first "
        f"that differs: {next((b for b in body if b not in lines), body[0] if body else '')!r}"
    )


@pytest.mark.parametrize(("page", "line", "body", "files"), excerpts("diff"))
def test_each_diff_excerpt_holds_lines_of_its_two_files(page, line, body, files):
    """`-` lines are the base's, `+` lines the step's, context lines both's; `...` skips."""
    base, step = (set(file_lines(name)) for name in files.split())
    for text in body:
        if text.strip() == "...":
            continue
        sign, code = text[:1], text[1:]
        where = {"-": [base], "+": [step], " ": [base, step]}.get(sign)
        assert where, f"{page}:{line}: {text!r} is not a line of a diff"
        assert all(code in lines for lines in where), (
            f"{page}:{line}: {text!r} is not in {files} as it is now"
        )


def test_every_marker_sits_right_above_a_block():
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        for number, text in enumerate(lines):
            if MARKER.match(text):
                following = lines[number + 1] if number + 1 < len(lines) else ""
                assert FENCE.match(following), f"{page}:{number + 1}: no code block right below"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: str) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2... as on GitHub."""
    text = (ROOT / page).read_text()
    text = re.sub(r"^(\s*)(`{3,}).*?^\1\2\s*$", "", text, flags=re.MULTILINE | re.DOTALL)
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.*)$", text, re.MULTILINE):
        base = slug(heading)
        count = seen[base] = seen.get(base, -1) + 1
        found.add(f"{base}-{count}" if count else base)
    return found


LINK = re.compile(r"\]\(([^)\s]+)\)|<a href=\"([^\"]+)\"")


@pytest.mark.parametrize("page", PAGES)
def test_each_relative_link_leads_to_a_file_and_anchor(page):
    here, wrong = (ROOT / page).parent, []
    for match in LINK.finditer(prose(page)):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:: not checked here
            continue
        path, _, anchor = target.partition("#")
        resolved = (here / path).resolve() if path else ROOT / page
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            wrong.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(
            resolved.relative_to(ROOT).as_posix()
        ):
            wrong.append(f"{target}: no such heading")
    assert not wrong, f"{page}: " + "; ".join(wrong)


# What a page asks a reader to run: `python script.py --flag ...` in its code blocks.

COMMAND = re.compile(r"(?:^|\$ |&& |; )python (?!-)(\S+\.py)([^#|;&]*)")


def commands() -> list:
    found = set()
    for page in PAGES:
        for _, language, body, _ in blocks(page):
            if language not in ("sh", "console", "bat", "powershell", ""):
                continue
            for text in body:
                for match in COMMAND.finditer(text.strip()):
                    found.add((page, match.group(1), match.group(2).strip()))
    return [pytest.param(*command, id=f"{command[0]}: {command[1]}") for command in sorted(found)]


@cache
def usage(script: str) -> str:
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, f"python {script} --help failed: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize(("page", "script", "arguments"), commands())
def test_each_command_names_a_script_that_takes_its_flags(page, script, arguments):
    assert (ROOT / script).is_file(), f"{page}: python {script}: no such script"
    try:
        words = shlex.split(arguments)
    except ValueError:  # a command cut by `...` or a placeholder: the flags are still words
        words = arguments.split()
    for flag in (word.split("=")[0] for word in words if word.startswith("--")):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", usage(script), re.MULTILINE), (
            f"{page}: python {script} takes no {flag}"
        )


# What curl shows: a `$ curl -sN "http://127.0.0.1:5000/...?count=N..."` in a console block
# (a stream that ends), with no pipe and no variable but a token, is asked of the page's server
# (its first `python stream_server*.py`), its pauses skipped, and must answer the lines shown
# under it. The token is one the server mints for the user of the last --json before it.

CURL = re.compile(
    r'^\$ curl -sN((?: -H "(?:[^"$]+|Authorization: Bearer \$\w+)")*) '
    r'"?http://127\.0\.0\.1:5000(/[^"\s$|]*)"?$'
)


def transcripts() -> list:
    found = []
    for page in PAGES:
        server = re.search(r"python (stream_server\w*)\.py", (ROOT / page).read_text())
        for line, language, body, _ in blocks(page):
            for number, text in enumerate(body if language == "console" else []):
                if (match := CURL.match(text)) and "count=" in match.group(2):
                    shown = []
                    for answer in body[number + 1 :]:
                        if answer.startswith("$ "):
                            break
                        shown.append(answer)
                    headers = dict(h.split(": ", 1) for h in re.findall(r'-H "([^"]+)"', text))
                    before = "\n".join(body[:number])
                    user = (re.findall(r'"user_id": "(\w+)"', before) or ["User1"])[-1]
                    found.append(
                        pytest.param(
                            server.group(1), match.group(2), headers, user, shown,
                            id=f"{page}:{line}",
                        )
                    )
    return found


@pytest.mark.parametrize(("module", "path", "headers", "user", "shown"), transcripts())
def test_each_curl_transcript_is_what_the_server_answers(
    module, path, headers, user, shown, monkeypatch
):
    step = importlib.import_module(module)
    monkeypatch.setattr(step, "sleep", lambda seconds: None)
    monkeypatch.setitem(step.app.config, "JWT_SECRET_KEY", TEST_KEY)
    client = step.app.test_client()
    if headers.get("Authorization", "").startswith("Bearer $"):
        minted = client.post("/generate_token", json={"user_id": user}).get_json()
        headers["Authorization"] = f"Bearer {minted['access_token']}"
    answer = client.get(path, headers=headers).get_data(as_text=True)
    assert answer.rstrip("\n").split("\n") == "\n".join(shown).rstrip("\n").split("\n")


# Screenshots: docs/ shows what the tests see.

GRAPHS = {"bench_capacity.png", "bench_fanout.png"}  # drawn by bench/graphs.py from results


@pytest.mark.parametrize("png", sorted(p.name for p in (ROOT / "docs").glob("*.png")))
def test_each_picture_in_docs_is_made_by_a_test_or_the_benchmark(png):
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    made = png in GRAPHS or re.search(rf"save_screenshot\([^)]*\"{re.escape(png)}\"", tests)
    assert made, f"docs/{png}: no test saves it with save_screenshot()"
    shown = any(f"{png})" in (ROOT / page).read_text() for page in PAGES)
    assert shown, f"docs/{png}: no page shows it"


def test_pages_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    for page in PAGES:
        lines = len((ROOT / page).read_text().splitlines())
        assert lines <= 700, f"{page}: {lines} lines; a page ends at 700"
