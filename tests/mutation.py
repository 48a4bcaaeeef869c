"""The mutation run: does every change in behaviour of a core module make a test fail?

    python tests/mutation.py                       # every module below, one mutant at a time
    python tests/mutation.py rooms.py --jobs 2     # one module, two mutants at once
    python tests/mutation.py serving.py --limit 10 # the first ten mutants only
    python tests/mutation.py serving.py --only 2,7 # mutants 2 and 7 again

mutmut (requirements-dev.txt, settings in pyproject.toml) makes the mutants: a comparison
flipped, a number moved by one, a string changed, an argument or a statement dropped. This
script, not `mutmut run`, runs them: the tests start the steps' servers (gunicorn, the
scripts, nginx) from the repository root in processes of their own, which mutmut's
in-process runner does not see. So each mutant is written into a copy of the repository,
and the module's tests (SELECTION) run there in a child process, forked from this one with
the heavy libraries already imported; the first failing test kills the mutant (-x). A
mutant whose tests run past the time limit is killed too (a test that hangs fails).
Not part of CI: it takes an hour or more. tests/README.md lists the known survivors.
"""

import argparse
import difflib
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each module's tests, fast ones first. Tests that need a browser or nginx are left out,
# for time: what they check of these modules, in-process tests check too.
SELECTION = {
    "tokens.py": [
        "tests/test_stream_multiuser_secure.py", "tests/test_stream_multiuser_refresh.py",
    ],
    "refresh_tokens.py": ["tests/test_stream_multiuser_refresh.py"],
    "rooms.py": [
        "tests/test_stream_chat.py",
        "-k", "not page and not nginx and not windows and not screenshot",
    ],
    "stream_server_chat.py": [
        "tests/test_stream_chat.py",
        "-k", "not page and not nginx and not windows and not screenshot",
    ],
    "stream_client_sse.py": ["tests/test_stream_sse.py"],
    # The dev server's tests, in the steps and under gunicorn (its write timeout), first.
    "serving.py": [
        *(f"tests/test_serving.py::{name}" for name in (
            "test_each_step_serves_with_its_request_handler",
            "test_the_dev_server_ends_a_stream_whose_client_stops_reading",
            "test_once_the_request_is_in_only_the_write_timeout_holds",
            "test_an_idle_connection_does_not_hold_up_https",
            "test_a_tls_handshake_that_never_comes_is_dropped",
            "test_a_request_head_sent_a_byte_at_a_time_gets_one_deadline",
            "test_past_the_deadline_no_read_waits_even_for_bytes_already_there",
            "test_tls_context_wants_both_files_or_neither",
            "test_gunicorn_ends_a_stream_whose_client_stops_reading",
            "test_under_gevent_streams_at_interval_0_let_other_clients_in",
        )),
        "tests/test_stream_multiuser_secure.py::test_the_server_serves_https_only_with_cert_and_key",
    ],
}
PRELOAD = [  # imported once here, so that each forked run starts fast
    "pytest", "flask", "werkzeug.serving", "requests", "redis", "fakeredis", "jwt",
    "trustme", "selenium.webdriver", "websocket", "psutil", "h11", "libcst",
]


def mutants(module: str) -> list[tuple[str, str]]:
    """mutmut's mutants of `module`: (the mutated source, a one-line diff) each."""
    from mutmut.mutation.file_mutation import create_mutations

    code = (ROOT / module).read_text()
    tree, mutations, _, _ = create_mutations(module, code)
    made = []
    for mutation in mutations:
        mutated = tree.deep_replace(mutation.original_node, mutation.mutated_node).code
        changed = difflib.unified_diff(code.splitlines(), mutated.splitlines(), n=0, lineterm="")
        lines = [line for line in changed if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        made.append((mutated, " | ".join(line.strip() for line in lines)))
    return made


def start_tests(copy: Path, selection: list[str]) -> int:
    """Run `selection` in `copy`, in a forked child with its own process group; its pid."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 3  # whatever happens, it exits here: never back into main() and its cleanup
        try:
            os.setpgid(0, 0)  # so that a timeout ends all it started
            os.chdir(copy)
            # The copy's modules, not the repository's: python put tests/ first on the path.
            ours = (ROOT, ROOT / "tests")
            sys.path[:] = [path for path in sys.path if Path(path).resolve() not in ours]
            sink = os.open(copy / "mutation.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            import pytest

            options = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
            code = int(pytest.main([*options, *selection]))
        finally:
            os._exit(code)
    return pid


def outcome(pid: int, deadline: float) -> str | None:
    """"passed", "failed" or "timeout" once the run has ended (or ran out of time), else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
    if time.monotonic() < deadline:
        return None
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(SELECTION), help="modules to mutate")
    parser.add_argument("--limit", type=int, help="at most this many mutants per module")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once")
    parser.add_argument("--only", help="these mutants only, by number: 3,17,40")
    parser.add_argument("--report", default="test-artifacts/mutation.json", help="results file")
    args = parser.parse_args()
    os.chdir(ROOT)  # mutmut reads its settings from pyproject.toml here
    for name in PRELOAD:
        importlib.import_module(name)
    report_path = ROOT / args.report
    report_path.parent.mkdir(exist_ok=True)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        ignore = shutil.ignore_patterns(
            ".git", "test-artifacts", "__pycache__", ".*cache", "mutation.log"
        )
        copies = [Path(scratch) / f"repo{job}" for job in range(args.jobs)]
        for copy in copies:
            shutil.copytree(ROOT, copy, ignore=ignore)
        for module in args.modules:
            selection, started = SELECTION[module], time.monotonic()
            pid = start_tests(copies[0], selection)
            while (result := outcome(pid, started + 1800)) is None:
                time.sleep(0.05)
            baseline = time.monotonic() - started
            if result != "passed":
                print(f"{module}: its tests fail without any mutant; fix them first")
                print((copies[0] / "mutation.log").read_text()[-3000:])
                return 1
            timeout = 3 * baseline + 30
            made = list(enumerate(mutants(module)[: args.limit], 1))
            if args.only:
                made = [mutant for mutant in made if str(mutant[0]) in args.only.split(",")]
            print(f"{module}: {len(made)} mutants; the tests take {baseline:.0f} s", flush=True)
            survived, killed, done = [], 0, 0
            running: dict[int, tuple] = {}  # pid: (copy, number, diff, deadline)
            free = list(copies)
            while made or running:
                while made and free:
                    copy = free.pop()
                    number, (source, diff) = made.pop(0)
                    (copy / module).write_text(source)
                    pid = start_tests(copy, selection)
                    running[pid] = (copy, number, diff, time.monotonic() + timeout)
                for pid, (copy, number, diff, deadline) in list(running.items()):
                    if (result := outcome(pid, deadline)) is None:
                        continue
                    del running[pid]
                    (copy / module).write_text((ROOT / module).read_text())
                    free.append(copy)
                    done += 1
                    if result == "passed":
                        survived.append(f"{number}: {diff}")
                        print(f"  {number}: SURVIVED {diff}", flush=True)
                    else:
                        killed += 1
                        print(f"  {number}: {result}", flush=True)
                    report[module] = {"mutants": done, "killed": killed, "survived": survived}
                    report_path.write_text(json.dumps(report, indent=1))
                time.sleep(0.05)
            print(f"{module}: {killed} of {done} killed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
