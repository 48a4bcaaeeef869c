"""Step 11: stream_server_jobs.py, jobs.py and stream_client_jobs.py: jobs in the server's own
threads (the default without REDIS_URL), then in a real RQ worker on a real Redis, behind
gunicorn with two workers and nginx, and the page in headless Chromium."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import redis
import requests
from flask import abort
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import jobs
import stream_client_jobs as jobs_client
import stream_server_jobs as server
from helpers import (
    ROOT,
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    only_help,
    save_screenshot,
    token_for,
    wait_in_page,
    wait_until,
)
from stream_client_sse import SSEParser

# The gated fixture holds the stand-in job's records (jobs.sleep) until the test lets them on.
pytestmark = pytest.mark.step(jobs)


@pytest.fixture(autouse=True)
def test_key(monkeypatch):
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)


@pytest.fixture
def in_process(monkeypatch):
    """The step's own store(), made without REDIS_URL: fakeredis, and jobs in threads."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setitem(server.app.config, "RECORD_SECONDS", 0)
    monkeypatch.delitem(server.app.extensions, "jobs", raising=False)
    yield server.store()
    server.app.extensions.pop("jobs", None)  # not left for the tests that follow


@pytest.fixture
def base(in_process, serve) -> str:
    return serve(server.app)


@pytest.fixture
def client(in_process):
    return server.app.test_client()


def start(base: str, count: int = 5, user: str = "Alice", **headers) -> str:
    response = requests.post(f"{base}/jobs", json={"count": count},
                             headers=bearer(token_for(user)) | headers, timeout=WAIT)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["Location"] == f"/jobs/{job_id}"
    return job_id


def state(base: str, job_id: str, user: str = "Alice") -> dict:
    response = requests.get(f"{base}/jobs/{job_id}", headers=bearer(token_for(user)),
                            timeout=WAIT)
    assert response.status_code == 200, response.text
    return response.json()


class Viewer:
    """GET /jobs/<id>/events, read in a thread of its own until `end` (or `stop` events);
    `events` holds what came, `first` is set once one has."""

    def __init__(self, base: str, job_id: str, user="Alice", headers=None, query="", stop=0):
        headers = bearer(token_for(user)) | (headers or {})
        self.response = requests.get(f"{base}/jobs/{job_id}/events{query}", headers=headers,
                                     stream=True, timeout=WAIT)
        assert self.response.status_code == 200, self.response.text
        self.events: list = []
        self.first, self.ended = threading.Event(), threading.Event()
        self.stop = stop
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        parser = SSEParser()
        try:
            for text in self.response.iter_content(chunk_size=None, decode_unicode=True):
                for event in parser.feed(text):
                    self.events.append(event)
                    self.first.set()
                    if event.type == "end" or len(self.events) == self.stop:
                        return
        finally:
            self.response.close()  # hangs up, as a viewer that leaves
            self.ended.set()

    def wait(self) -> list:
        if not self.ended.wait(WAIT):
            self.response.close()
            raise AssertionError(f"the stream never ended: {self.events[-3:]}")
        return self.events

    def ids(self) -> list[str]:
        return [event.id for event in self.wait()]


def stored_ids(store, job_id: str) -> list[str]:
    return [event_id for event_id, _ in store.redis.xrange(f"job:{job_id}:events")]


# In this process, without REDIS_URL: jobs in the server's threads, on fakeredis


def test_a_job_runs_and_its_events_are_its_stream(base, in_process):
    job_id = start(base, count=40)
    events = Viewer(base, job_id).wait()
    assert [event.type for event in events] == ["progress"] * 40 + ["end"]
    progress = [json.loads(event.data) for event in events[:-1]]
    assert [p["done"] for p in progress] == list(range(1, 41))
    assert {p["total"] for p in progress} == {40}
    failed = {p["record"]: p["error"] for p in progress if "error" in p}
    assert failed == {17: "record 17: the price is not a number",
                      34: "record 34: the price is not a number"}  # the same in every run
    assert json.loads(events[-1].data) == {"state": "done"}
    assert [event.id for event in events] == stored_ids(in_process, job_id)
    now = int(time.time())
    job = state(base, job_id)
    assert job.keys() == {"id", "state", "done", "total", "failed", "started", "ended"}
    assert (job["id"], job["state"], job["done"], job["total"], job["failed"]) == (
        job_id, "done", 40, 40, 2)
    assert now - 5 <= job["started"] <= job["ended"] <= now


def test_the_server_says_what_the_in_process_default_cannot_do(monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delitem(server.app.extensions, "jobs", raising=False)
    server.store()
    assert ("REDIS_URL is unset: jobs run in threads of this process; they do not survive a "
            "restart or deploy, and no other process sees them") in caplog.text
    server.app.extensions.pop("jobs")


@pytest.mark.parametrize("how", ["header", "query"])
def test_last_event_id_resumes_with_no_gap_and_no_duplicate(base, how):
    job_id = start(base, count=20)
    everything = Viewer(base, job_id).wait()
    after = everything[9].id
    if how == "header":
        resumed = Viewer(base, job_id, headers={"Last-Event-ID": after})
    else:  # what a page sends once its EventSource has given up
        resumed = Viewer(base, job_id, query=f"?last_event_id={after}")
    assert resumed.wait() == everything[10:]


def test_a_late_viewer_gets_the_history_then_live_events(base, in_process, gated):
    job_id = start(base, count=6)
    early = Viewer(base, job_id)
    for _ in range(2):  # records 1 and 2 are done, record 3 waits at the gate
        gated.wait_for_pause()
        gated.let_one_through()
    gated.wait_for_pause()
    wait_until(lambda: len(early.events) == 2)
    late = Viewer(base, job_id)
    wait_until(lambda: len(late.events) == 2)  # the history, at once
    gated.open()
    assert late.ids() == early.ids() == stored_ids(in_process, job_id)
    assert len(late.events) == 7


def test_the_job_goes_on_when_its_viewer_leaves(base, in_process, gated, caplog):
    caplog.set_level("INFO")
    job_id = start(base, count=50)
    gated.let_one_through()
    viewer = Viewer(base, job_id, stop=1)  # reads one event and hangs up
    viewer.wait()
    gated.open()
    # The server notices at its next write and frees the thread; the job does not care.
    wait_until(lambda: f"a viewer of job {job_id} (pid {os.getpid()}) ended" in caplog.text)
    wait_until(lambda: state(base, job_id)["state"] == "done")
    assert state(base, job_id)["done"] == 50


def test_cancel_stops_the_job_before_its_next_record(base, in_process, gated):
    job_id = start(base, count=100)
    viewer = Viewer(base, job_id)
    gated.wait_for_pause()
    gated.let_one_through()
    gated.wait_for_pause()  # record 2 is under way
    cancelled = requests.post(f"{base}/jobs/{job_id}/cancel",
                              headers=bearer(token_for("Alice")), timeout=WAIT)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"id": job_id, "state": "cancelled"}
    gated.open()
    events = viewer.wait()
    assert [(e.type, json.loads(e.data)) for e in events] == [
        ("progress", {"done": 1, "total": 100, "record": 1}), ("end", {"state": "cancelled"})
    ]
    job = state(base, job_id)
    assert (job["state"], job["done"]) == ("cancelled", 1)  # record 2 was not counted
    again = requests.post(f"{base}/jobs/{job_id}/cancel", headers=bearer(token_for("Alice")),
                          timeout=WAIT)
    assert (again.status_code, again.json()) == (409, {"error": "the job has ended already"})


@pytest.mark.parametrize("route", ["", "/events", "/cancel"])
def test_only_its_owner_sees_a_job(client, gated, route):
    job_id = client.post("/jobs", json={"count": 3}, headers=bearer(token_for("Alice"))).json["id"]
    method = client.post if route == "/cancel" else client.get
    response = method(f"/jobs/{job_id}{route}", headers=bearer(token_for("Bob")))
    assert (response.status_code, response.json) == (404, {"error": "no such job (or not yours)"})
    gated.open()


def test_an_idempotency_key_gives_the_same_job_on_a_retry(base, gated):
    first = start(base, count=3, **{"Idempotency-Key": "import-42"})
    assert start(base, count=3, **{"Idempotency-Key": "import-42"}) == first
    assert start(base, count=3, **{"Idempotency-Key": "import-43"}) != first
    assert start(base, count=3, user="Bob", **{"Idempotency-Key": "import-42"}) != first
    gated.open()


def test_a_user_has_at_most_three_jobs_queued_or_running(base, gated):
    mine = [start(base, count=2) for _ in range(3)]
    refused = requests.post(f"{base}/jobs", json={"count": 2},
                            headers=bearer(token_for("Alice")), timeout=WAIT)
    assert refused.status_code == 429
    assert refused.json() == {"error": "you have 3 jobs queued or running: wait for one to end"}
    start(base, count=2, user="Bob")  # others are not held back
    requests.post(f"{base}/jobs/{mine[0]}/cancel", headers=bearer(token_for("Alice")),
                  timeout=WAIT)
    start(base, count=2)  # one has ended: room for the next
    gated.open()


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        ({"count": 0}, {}, 400, "count must be a whole number from 1 to 10000"),
        ({"count": 10_001}, {}, 400, "count must be a whole number from 1 to 10000"),
        ({"count": "5"}, {}, 400, "count must be a whole number from 1 to 10000"),
        ({"count": True}, {}, 400, "count must be a whole number from 1 to 10000"),
        ({"count": 2.5}, {}, 400, "count must be a whole number from 1 to 10000"),
        ([5], {}, 400, 'the body must be a JSON object such as {"user_id": "User1"}'),
        ({"count": 3}, {"Idempotency-Key": "a/b"}, 400,
         "Idempotency-Key must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"),
        ({"count": 3}, {"Idempotency-Key": "k" * 65}, 400,
         "Idempotency-Key must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"),
    ],
)
def test_bad_starts_get_a_clear_error(client, body, headers, status, error):
    response = client.post("/jobs", json=body, headers=bearer(token_for("Alice")) | headers)
    assert (response.status_code, response.json) == (status, {"error": error})


def test_bodies_that_are_not_json_or_too_big(client):
    headers = bearer(token_for("Alice"))
    assert client.post("/jobs", data="count=5", headers=headers).status_code == 415
    big = client.post("/jobs", data=" " * 20_000, headers=headers,
                      content_type="application/json")
    assert big.status_code == 413 and "error" in big.json


@pytest.mark.parametrize("job_id", ["nope", "0" * 24, "A" * 24, "%2e%2e"])
def test_an_unknown_job_gets_404(client, job_id):
    response = client.get(f"/jobs/{job_id}", headers=bearer(token_for("Alice")))
    assert (response.status_code, response.json) == (404, {"error": "no such job (or not yours)"})


@pytest.mark.parametrize("last_id", ["5", "abc", "1-2-3", "1" * 20 + "-0"])
def test_a_bad_last_event_id_gets_400(client, gated, last_id):
    job_id = client.post("/jobs", json={"count": 2}, headers=bearer(token_for("Alice"))).json["id"]
    for sent in ({"Last-Event-ID": last_id}, {}):
        query = "" if sent else f"?last_event_id={last_id}"
        response = client.get(f"/jobs/{job_id}/events{query}",
                              headers=bearer(token_for("Alice")) | sent)
        assert response.status_code == 400
        error = "Last-Event-ID must be the id of an event this server sent"
        assert response.json == {"error": error}
    gated.open()


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/jobs"), ("get", "/jobs/x"), ("get", "/jobs/x/events"), ("post", "/jobs/x/cancel")],
)
def test_every_job_route_needs_a_token(client, method, path):
    response = getattr(client, method)(path, json={})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="streams"'


def test_the_events_take_the_token_from_the_pages_cookie(base, client):
    job_id = start(base, count=3)
    client.set_cookie("access_token", token_for("Alice"), path="/jobs")
    assert client.get(f"/jobs/{job_id}/events").status_code == 200
    client.set_cookie("access_token", token_for("Bob"), path="/jobs")
    assert client.get(f"/jobs/{job_id}/events").status_code == 404
    client.set_cookie("access_token", "not-a-token", path="/jobs")
    response = client.get(f"/jobs/{job_id}/events")
    assert (response.status_code, response.json["error"]) == (401, "invalid_token")
    # Only to read: a POST with the cookie alone, as a forged form would send, changes nothing.
    client.set_cookie("access_token", token_for("Alice"), path="/jobs")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 401


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_job_that_breaks_ends_as_failed(base, monkeypatch):
    def process(number: int, record_seconds: float) -> None:
        if number == 3:
            raise RuntimeError("a bug in the job")  # not a record's ValueError: the job's end

    monkeypatch.setattr(jobs, "process", process)
    job_id = start(base, count=10)
    events = Viewer(base, job_id).wait()
    assert [(e.type, json.loads(e.data)) for e in events[2:]] == [("end", {"state": "failed"})]
    assert (state(base, job_id)["state"], state(base, job_id)["done"]) == ("failed", 2)


def test_the_page_is_served(client):
    with client.get("/") as response:  # closing it closes the file it was sent from
        assert response.mimetype == "text/html"
        assert "<title>A long job, watched live</title>" in response.text


def test_help_prints_only_the_help():
    assert only_help("stream_server_jobs.py")
    assert only_help("stream_client_jobs.py")


@pytest.mark.parametrize(("name", "value"), [("JOB_LIVENESS", "soon"), ("JOB_TTL", "-1")])
def test_bad_job_settings_stop_the_server_with_one_line(name, value):
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode(), name: value}
    result = subprocess.run([sys.executable, "stream_server_jobs.py", "--port", "0"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 1
    assert result.stderr == f"{name} must be a number of seconds above 0, got {value!r}\n"


def test_record_seconds_out_of_range_is_refused_at_start():
    command = [sys.executable, "stream_server_jobs.py", "--record-seconds", "-1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert "--record-seconds must be from 0 to 60" in result.stderr


# The client, against the server in this process


def test_client_starts_a_job_and_redraws_its_progress(base, capsys):
    assert jobs_client.main(["--url", base, "--user", "Alice", "--count", "20"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("job ") and err.endswith(" (Ctrl-C stops watching; the job goes on)\n")
    job_id = err.split()[1]
    lines = out.split("\n")
    assert lines[0].startswith("\r[#" + " " * 29 + "] 1/20 records")
    assert lines[0].endswith("\r" + " " * 60 + "\rfailed: record 17: the price is not a number")
    assert lines[1].endswith(f"\r[{'#' * 30}] 20/20 records")
    assert lines[2:] == [f"job {job_id}: done", ""]


def test_client_follows_and_cancels_a_job_by_its_id(base, gated, capsys):
    job_id = start(base, count=10)
    assert jobs_client.main(["--url", base, "--user", "Alice", "--job", job_id, "--cancel"]) == 0
    assert capsys.readouterr().out == f"job {job_id}: cancelled\n"
    gated.open()
    assert jobs_client.main(["--url", base, "--user", "Alice", "--job", job_id]) == 1
    assert capsys.readouterr().out.endswith(f"job {job_id}: cancelled\n")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--job", "0" * 24], "error: server answered 404: no such job (or not yours)\n"),
        (["--count", "0"], "error: server answered 400: count must be a whole number from 1 to "
                           "10000\n"),
        (["--job", "0" * 24, "--cancel"], "error: server answered 404: no such job (or not "
                                          "yours)\n"),
    ],
)
def test_client_says_what_is_wrong_in_one_line(base, capsys, argv, error):
    assert jobs_client.main(["--url", base, *argv]) == 1
    assert capsys.readouterr().err.endswith(error)


def test_client_names_the_server_to_start(capsys):
    assert jobs_client.main(["--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err.endswith("is the server running? Start it with: "
                                            "python stream_server_jobs.py\n")


def test_client_tries_again_when_a_proxy_answers_502(base, monkeypatch, capsys):
    job_id = start(base, count=3)
    Viewer(base, job_id).wait()
    mint, calls = server.app.view_functions["tokens.generate_token"], []

    def once_502():  # what nginx answers while gunicorn restarts
        calls.append(1)
        if len(calls) == 1:
            abort(502, "no app instance answered: try again in a moment")
        return mint()

    monkeypatch.setitem(server.app.view_functions, "tokens.generate_token", once_502)
    waits: list[float] = []
    monkeypatch.setattr(jobs_client, "time", SimpleNamespace(sleep=waits.append))
    assert jobs_client.main(["--url", base, "--user", "Alice", "--job", job_id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"\r{'':60}\r(the server is not there, or cannot reach Redis; "
                          "resuming after none in 2s)\n")
    assert out.endswith(f"job {job_id}: done\n") and waits == [2]


def test_client_shows_no_control_character_from_the_server(monkeypatch, capsys):
    events = [jobs_client.Event("progress", json.dumps(
        {"done": 1, "total": 2, "record": 1, "error": "bad \x1b[2J\rrow"}), "1-0"),
        jobs_client.Event("end", json.dumps({"state": "done\x07"}), "2-0")]
    monkeypatch.setattr(jobs_client, "post", lambda *args, **body: {"id": "j"})
    monkeypatch.setattr(jobs_client, "follow", lambda *args: iter(events))
    assert jobs_client.main([]) == 1
    out = capsys.readouterr().out
    assert "failed: bad ?[2J?row" in out and "job j: done?" in out and "\x1b" not in out


# A real Redis and a real RQ worker (`rq worker --url "$REDIS_URL" jobs`), the server in this
# process: JOB_LIVENESS and JOB_TTL as both read them.

LIVENESS, TTL = 4, 600  # seconds: short, and yet long enough for a machine under load


@pytest.fixture
def redis_jobs(monkeypatch, redis_url, rq_worker):
    """The server's store() on a real Redis, and a start(), of one RQ worker each call."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setitem(server.app.config, "RECORD_SECONDS", 0.01)
    for module in (jobs, server):
        monkeypatch.setattr(module, "LIVENESS", LIVENESS, raising=False)
    monkeypatch.setattr(jobs, "TTL", TTL)
    monkeypatch.delitem(server.app.extensions, "jobs", raising=False)
    store = server.store()
    env = {"JOB_LIVENESS": str(LIVENESS), "JOB_TTL": str(TTL)}
    yield store, lambda: rq_worker(redis_url, env)
    server.app.extensions.pop("jobs", None)
    store.redis.close()


@pytest.fixture
def redis_base(redis_jobs, serve) -> str:
    return serve(server.app)


def test_a_job_runs_in_the_rq_worker_and_two_viewers_see_the_same_events(
    redis_jobs, redis_base
):
    store, worker = redis_jobs
    rq = worker()
    job_id = start(redis_base, count=30)
    first, second = Viewer(redis_base, job_id), Viewer(redis_base, job_id)
    assert first.ids() == second.ids() == stored_ids(store, job_id)
    assert len(first.events) == 31 and json.loads(first.events[-1].data) == {"state": "done"}
    rq.wait_for_line(rf"Job OK \({job_id}\)")
    # A finished job's state and events expire after JOB_TTL.
    for key in (f"job:{job_id}", f"job:{job_id}:events"):
        assert 0 < store.redis.ttl(key) <= TTL


def test_a_job_waits_in_the_queue_until_a_worker_takes_it(redis_jobs, redis_base):
    _, worker = redis_jobs
    job_id = start(redis_base, count=3)
    viewer = Viewer(redis_base, job_id)
    assert state(redis_base, job_id)["state"] == "queued"
    worker()
    assert [e.type for e in viewer.wait()] == ["progress"] * 3 + ["end"]


def test_cancel_stops_the_job_in_the_worker(redis_jobs, redis_base):
    _, worker = redis_jobs
    rq = worker()
    job_id = start(redis_base, count=10_000)
    viewer = Viewer(redis_base, job_id)
    assert viewer.first.wait(WAIT)
    requests.post(f"{redis_base}/jobs/{job_id}/cancel", headers=bearer(token_for("Alice")),
                  timeout=WAIT)
    assert json.loads(viewer.wait()[-1].data) == {"state": "cancelled"}
    rq.wait_for_line(rf"Job OK \({job_id}\)")  # the worker stopped it, and is free again
    done = state(redis_base, job_id)["done"]
    assert done < 10_000 and done == len(viewer.events) - 1


def test_a_job_whose_worker_is_killed_is_lost_and_its_viewers_are_told(redis_jobs, redis_base):
    store, worker = redis_jobs
    rq = worker()
    job_id = start(redis_base, count=10_000)
    viewer = Viewer(redis_base, job_id)
    assert viewer.first.wait(WAIT)
    # Lost within JOB_LIVENESS: the heartbeat lives half of it, and a viewer looks every half.
    assert 0 < store.redis.pttl(f"job:{job_id}:alive") <= LIVENESS * 500
    rq.kill()  # SIGKILL to the worker and its work horse: no goodbye
    assert json.loads(viewer.wait()[-1].data) == {"state": "lost"}
    job = state(redis_base, job_id)
    assert job["state"] == "lost" and job["done"] == len(viewer.events) - 1


def test_a_lost_job_frees_its_place_in_the_users_limit(redis_jobs, redis_base):
    _, worker = redis_jobs
    rq = worker()
    jobs_started = [start(redis_base, count=10_000) for _ in range(3)]
    wait_until(lambda: state(redis_base, jobs_started[0])["state"] == "running")
    rq.kill()
    wait_until(lambda: state(redis_base, jobs_started[0])["state"] == "lost")
    start(redis_base, count=1)


def test_the_workers_warm_shutdown_lets_its_job_finish(redis_jobs, redis_base):
    _, worker = redis_jobs
    rq = worker()
    job_id = start(redis_base, count=100)
    viewer = Viewer(redis_base, job_id)
    assert viewer.first.wait(WAIT)
    rq.process.send_signal(signal.SIGTERM)  # what a deploy of the worker sends
    assert json.loads(viewer.wait()[-1].data) == {"state": "done"}
    assert rq.process.wait(WAIT) == 0


def test_a_redis_that_is_gone_gets_503(monkeypatch, redis_server):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delitem(server.app.extensions, "jobs", raising=False)
    response = server.app.test_client().post("/jobs", json={"count": 1},
                                             headers=bearer(token_for("Alice")))
    assert (response.status_code, response.json) == (
        503, {"error": "Redis is unavailable; try again in a moment"})
    server.app.extensions.pop("jobs")


def test_job_settings_come_from_the_environment():
    code = "import jobs; print(jobs.LIVENESS, jobs.TTL)"
    env = {**os.environ, "JOB_LIVENESS": "7", "JOB_TTL": "90"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=WAIT)
    assert result.stdout == "7.0 90\n"



# The docs' deployment: an RQ worker, gunicorn with two workers, nginx in front; the page in
# headless Chromium

# Put in every page before its own script: keeps the id of each event that any EventSource
# of the page gets, and each URL it opens, for the test to compare.
RECORDER = """
window.seen = [];
window.opened = [];
const Original = window.EventSource;
window.EventSource = class extends Original {
  constructor(url, options) {
    super(url, options);
    window.opened.push(String(url));
    for (const type of ["progress", "end"]) {
      this.addEventListener(type, (event) => window.seen.push(event.lastEventId));
    }
  }
};
"""


@pytest.fixture
def deployed(redis_url, rq_worker, gunicorn, nginx):
    """The step as docs/11-jobs.md deploys it; restart() starts gunicorn again on its port."""
    port = free_port()
    env = {"REDIS_URL": redis_url, "JOBS_RECORD_SECONDS": "0.02"}

    def restart():
        return gunicorn("stream_server_jobs", workers=2, extra=["-b", f"127.0.0.1:{port}"],
                        env=env)

    worker, app = rq_worker(redis_url), restart()
    proxy = nginx(port)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    yield SimpleNamespace(worker=worker, app=app, url=proxy.url, restart=restart, redis=store)
    store.close()


@pytest.fixture
def page(browser):
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    yield browser
    browser.get("about:blank")  # leaves the job: its stream closes


def seen(page) -> list[str]:
    return page.execute_script("return window.seen")


def status(page) -> str:
    return page.find_element(By.ID, "status").text


def started(page, url: str, count: int = 10_000, user: str = "Alice") -> str:
    """Start a job from the page; its id, once the page shows its first event."""
    page.get(url)
    for element_id, value in (("user", user), ("count", str(count))):
        field = page.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)
    page.find_element(By.ID, "start").click()
    wait_in_page(page, lambda: len(seen(page) or []) >= 3, "the first events")
    query = dict(part.split("=") for part in page.current_url.split("?")[1].split("&"))
    assert query["user"] == user
    return query["job"]


def cancelled(page) -> None:
    page.find_element(By.ID, "cancel").click()
    wait_in_page(page, lambda: status(page).startswith("cancelled: job"), "the end: cancelled")


def stored(deployed, job_id: str) -> list[str]:
    return [event_id for event_id, _ in deployed.redis.xrange(f"job:{job_id}:events")]


def test_a_reload_follows_the_job_again_with_exact_event_ids(deployed, page):
    job_id = started(page, deployed.url)
    before = seen(page)
    page.refresh()  # the job id is in the address bar
    wait_in_page(page, lambda: len(seen(page)) > len(before), "the events again, and new ones")
    cancelled(page)
    ids = stored(deployed, job_id)
    assert seen(page) == ids  # after the reload: the history, then live, each once
    assert before == ids[: len(before)]
    assert page.find_element(By.ID, "job").text == f"job {job_id}"


def test_the_page_resumes_when_the_worker_serving_it_is_killed(deployed, page):
    job_id = started(page, deployed.url)
    line = deployed.app.wait_for_line(rf"a viewer of job {job_id} \(pid (\d+)\) started")
    os.kill(int(line.group(1)), signal.SIGKILL)
    before = len(seen(page))
    # EventSource reconnects by itself, with Last-Event-ID, through nginx to a live worker.
    deployed.app.wait_for_line(rf"a viewer of job {job_id} \(pid \d+\) started after event \d")
    wait_in_page(page, lambda: len(seen(page)) > before + 3, "events after the kill")
    cancelled(page)
    assert seen(page) == stored(deployed, job_id)  # no gap, no duplicate


def test_a_gunicorn_restart_mid_job_leaves_the_job_running(deployed, page):
    job_id = started(page, deployed.url)
    deployed.app.stop()  # SIGTERM: gunicorn's graceful stop, as a deploy does it
    done = int(deployed.redis.hget(f"job:{job_id}", "done"))
    # nginx answers 502 while no gunicorn listens: EventSource gives up, the page does not.
    wait_in_page(page, lambda: status(page).startswith("the server is away"), "the retries")
    wait_until(lambda: int(deployed.redis.hget(f"job:{job_id}", "done")) > done + 10)
    deployed.restart()
    # nginx gives an instance that refused fail_timeout (10 s) before it tries it again; the
    # page's back-off (1, 2, 4, 8 s...) finds it back after that.
    WebDriverWait(page, 3 * WAIT, poll_frequency=0.05).until(
        lambda _: status(page) == f"running: job {job_id}", message=f"still {status(page)!r}"
    )
    assert any("?last_event_id=" in url for url in page.execute_script("return window.opened"))
    cancelled(page)
    assert seen(page) == stored(deployed, job_id)


def test_two_tabs_watch_one_job(deployed, page):
    job_id = started(page, deployed.url)
    first = page.current_window_handle
    page.switch_to.new_window("tab")
    page.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
    page.get(f"{deployed.url}/?job={job_id}&user=Alice")
    wait_in_page(page, lambda: len(seen(page) or []) >= 3, "the second tab's events")
    cancelled(page)
    second = seen(page)
    page.close()
    page.switch_to.window(first)
    wait_in_page(page, lambda: status(page).startswith("cancelled: job"), "the first tab's end")
    assert seen(page) == second == stored(deployed, job_id)


def test_a_page_that_is_left_frees_its_server_thread_at_once(deployed, page):
    job_id = started(page, deployed.url)
    page.get("about:blank")
    deployed.app.wait_for_line(rf"a viewer of job {job_id} \(pid \d+\) ended")
    assert deployed.redis.hget(f"job:{job_id}", "state") == "running"  # the job goes on
    requests.post(f"{deployed.url}/jobs/{job_id}/cancel", headers=bearer(token_for("Alice")),
                  timeout=WAIT)


def test_another_users_job_is_not_shown(deployed, page):
    job_id = started(page, deployed.url, count=10)
    page.get(f"{deployed.url}/?job={job_id}&user=Bob")
    wait_in_page(page, lambda: status(page) == "no such job (or not yours)", "the refusal")


def test_screenshot_of_the_page(deployed, page):
    """For people to look at (test-artifacts/jobs_page.png): a job under way, some failed."""
    job_id = started(page, deployed.url, count=200)
    wait_in_page(page, lambda: len(seen(page)) >= 120, "more than half of the job")
    assert save_screenshot(page, "jobs_page.png")
    requests.post(f"{deployed.url}/jobs/{job_id}/cancel", headers=bearer(token_for("Alice")),
                  timeout=WAIT)
