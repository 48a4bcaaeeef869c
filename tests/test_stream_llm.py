"""Step 9: OpenAI's Chat Completions stream, read by the official openai client, httpx-sse and
h11; generation that stops when its reader leaves, directly and through the relay; bad input
answered in OpenAI's shape."""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import h11
import httpx
import openai
import pytest
import requests
from httpx_sse import connect_sse

import completions
import stream_client_llm
import stream_server_llm as server
from helpers import (
    ROOT,
    TEST_KEY,
    WAIT,
    bearer,
    free_port,
    https_step,
    only_help,
    port_of,
    run_step,
    stop_step,
    token_for,
    wait_until,
)

pytestmark = pytest.mark.step(server)

PROMPT = [{"role": "user", "content": "Why stream an answer?"}]
EXPECTED = completions.StandInModel(1, 0).answer("Why stream an answer?")


@pytest.fixture
def app(monkeypatch):
    """The step's app with the tests' key, at full speed (no first-token delay)."""
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setitem(server.app.config, "TOKENS_PER_SECOND", 10_000)
    monkeypatch.setitem(server.app.config, "DELAY", 0)
    monkeypatch.setitem(server.app.config, "UPSTREAM", None)
    return server.app


@pytest.fixture
def url(serve, app) -> str:
    return serve(app)


def client_for(base: str, user: str = "Alice", **options) -> openai.OpenAI:
    # max_retries=0: the official client tries 429s and 5xx again by itself.
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token_for(user), max_retries=0, **options)


def status(base: str) -> dict:
    answer = requests.get(f"{base}/status", headers=bearer(token_for("Operator")), timeout=WAIT)
    assert answer.status_code == 200, answer.text
    return answer.json()


def post(base: str, body: dict, user: str = "Alice", **options) -> requests.Response:
    url = f"{base}/v1/chat/completions"
    return requests.post(url, json=body, headers=bearer(token_for(user)), timeout=WAIT, **options)


def events_of(response: requests.Response):
    """The data of each event of a streamed answer, as they arrive (UTF-8, as SSE always is)."""
    parser = stream_client_llm.SSEParser()
    for piece in response.iter_content(chunk_size=None):
        for event in parser.feed(piece.decode()):
            yield event.data


def stream_body(**fields) -> dict:
    return {"model": completions.MODEL, "messages": PROMPT, "stream": True, **fields}


# The official openai client


def test_the_official_client_reads_the_stream_token_by_token(url):
    chunks = list(client_for(url).chat.completions.create(
        model=completions.MODEL, messages=PROMPT, stream=True
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == EXPECTED
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({chunk.id for chunk in chunks}) == 1
    assert any(not token.isascii() for token in EXPECTED)  # the text goes beyond ASCII


def test_streamed_and_not_streamed_give_the_same_text(url):
    client = client_for(url)
    for max_tokens in (None, 7):
        limit = {} if max_tokens is None else {"max_completion_tokens": max_tokens}
        whole = client.chat.completions.create(model=completions.MODEL, messages=PROMPT, **limit)
        streamed = client.chat.completions.create(
            model=completions.MODEL, messages=PROMPT, stream=True, **limit
        )
        chunks = list(streamed)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert whole.object == "chat.completion"
        assert whole.choices[0].message.content == text == "".join(EXPECTED[:max_tokens])
        assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
        assert whole.choices[0].finish_reason == ("length" if max_tokens else "stop")


def test_include_usage_adds_a_last_chunk_with_the_counts(url):
    chunks = list(client_for(url).chat.completions.create(
        model=completions.MODEL, messages=PROMPT, stream=True, max_tokens=5,
        stream_options={"include_usage": True},
    ))
    *answer, last = chunks
    assert last.choices == []
    assert last.usage.completion_tokens == 5 == len(answer) - 2  # role and finish chunks
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(chunk.usage is None for chunk in answer)


def test_models_lists_the_one_model(url):
    assert [model.id for model in client_for(url).models.list()] == [completions.MODEL]


@pytest.mark.parametrize(
    ("error", "changes"),
    [
        (openai.AuthenticationError, {"api_key": "not-a-token"}),
        (openai.BadRequestError, {"messages": []}),
        (openai.BadRequestError, {"max_tokens": 0}),
        (openai.NotFoundError, {"model": "gpt-9"}),
        (openai.APIStatusError, {"messages": [{"role": "user", "content": "x" * 70_000}]}),
    ],
    ids=["bad key", "no messages", "max_tokens 0", "unknown model", "too large"],
)
def test_each_error_is_the_official_clients_typed_error(url, error, changes):
    key = changes.pop("api_key", token_for("Alice"))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    request = {"model": completions.MODEL, "messages": PROMPT, "stream": True, **changes}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)
    assert set(raised.value.body) == {"message", "type", "param", "code"}
    if error is openai.AuthenticationError:  # step 3's challenge is kept
        challenge = raised.value.response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="streams", error="invalid_token"')


def test_beyond_the_users_limit_a_429_with_retry_after(url, gated, monkeypatch):
    monkeypatch.setitem(server.app.config, "AT_ONCE", 1)
    with post(url, stream_body(), stream=True) as first:
        assert first.status_code == 200
        gated.wait_for_pause()  # Alice's first answer is under way
        with pytest.raises(openai.RateLimitError) as raised:
            client_for(url).chat.completions.create(model=completions.MODEL, messages=PROMPT)
        assert raised.value.response.headers["Retry-After"] == "5"
        assert raised.value.code == "rate_limit_exceeded"
        # Another user is not held back by Alice's answers.
        with post(url, stream_body(), user="Bob", stream=True) as bobs:
            assert bobs.status_code == 200
    gated.open()
    wait_until(lambda: status(url)["generating"] == 0)


# Two more independent readers: httpx-sse, and h11 on the raw bytes


def test_httpx_sse_reads_the_same_events(url):
    headers = bearer(token_for("Alice"))
    with (
        httpx.Client(timeout=WAIT) as client,
        connect_sse(client, "POST", f"{url}/v1/chat/completions", json=stream_body(),
                    headers=headers) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        data = [event.data for event in source.iter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == EXPECTED


def raw_exchange(base: str, body: dict) -> list:
    """POST over a bare socket; h11 checks every byte of the answer as a strict HTTP/1.1
    client would. Returns h11's events, up to and including the first after the message."""
    payload = json.dumps(body).encode()
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="POST", target="/v1/chat/completions", headers=[
        ("Host", "127.0.0.1"), ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Authorization", f"Bearer {token_for('Alice')}"),
    ])
    events = []
    with socket.create_connection(("127.0.0.1", port_of(base)), timeout=WAIT) as sock:
        sock.sendall(connection.send(request) + connection.send(h11.Data(data=payload)))
        sock.sendall(connection.send(h11.EndOfMessage()))
        while not events or type(events[-1]) is not h11.EndOfMessage:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            else:
                events.append(event)
    return events


def test_h11_reads_a_well_formed_chunked_answer_that_ends_right_after_done(url):
    response, *data, end = raw_exchange(url, stream_body())
    assert response.status_code == 200
    headers = dict(response.headers)
    assert headers[b"transfer-encoding"] == b"chunked"
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert type(end) is h11.EndOfMessage
    body = b"".join(event.data for event in data)
    assert body.endswith(b"\n\ndata: [DONE]\n\n")  # nothing after [DONE] but the last chunk
    assert body.count(b"[DONE]") == 1
    # Every event is a single data line with one JSON object, till [DONE].
    blocks = body.decode().split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    assert len(blocks) == len(EXPECTED) + 3  # the role, the tokens, the finish, [DONE]


# Generation only while someone reads


def test_a_client_that_leaves_stops_the_generation_within_one_token(url, gated, caplog):
    caplog.set_level(logging.INFO, logger=server.__name__)
    before = status(url)["tokens_generated"]
    with post(url, stream_body(), user="User1", stream=True) as answer:
        data = events_of(answer)
        assert json.loads(next(data))["choices"][0]["delta"]["role"] == "assistant"
        for number in range(3):
            gated.wait_for_pause()
            gated.let_one_through()
            assert json.loads(next(data))["choices"][0]["delta"]["content"] == EXPECTED[number]
        gated.wait_for_pause()  # token 4 is being generated: the client leaves
    gated.open()
    wait_until(lambda: status(url)["generating"] == 0)
    assert status(url)["tokens_generated"] - before <= 4  # at most one more than read
    line = f"User1 left after 3 of {len(EXPECTED)} tokens; generation stopped"
    wait_until(lambda: line in caplog.messages)


def test_a_stream_is_uncounted_when_it_ends_even_if_the_server_never_closes_it(app):
    # Werkzeug's server skips the response's close() when reading what is left of a request
    # fails, as when a client resets its connection: a count dropped in close() would stay.
    test_client = app.test_client()
    answer = test_client.post("/v1/chat/completions", json=stream_body(max_tokens=2),
                              headers=bearer(token_for()), buffered=False)
    assert status_of(app)["generating"] == 1
    for _ in answer.response:  # the whole body, and no close()
        pass
    assert status_of(app)["generating"] == 0
    answer.close()


def status_of(app) -> dict:
    return app.test_client().get("/status", headers=bearer(token_for())).get_json()


def test_status_counts_generations_and_tokens(url, gated):
    before = status(url)
    assert set(before) == {"generating", "tokens_generated", "pid"}
    with post(url, stream_body(), stream=True):
        gated.wait_for_pause()
        assert status(url)["generating"] == before["generating"] + 1
    gated.open()
    wait_until(lambda: status(url)["generating"] == 0)
    assert requests.get(f"{url}/status", timeout=WAIT).status_code == 401


def test_a_slow_first_token_is_preceded_by_keep_alive_comments(url, pauses, monkeypatch):
    monkeypatch.setitem(server.app.config, "DELAY", 40)  # recorded, not slept
    with post(url, stream_body(max_tokens=1), stream=True) as answer:
        body = answer.content.decode()
    assert body.count(": keep-alive\n\n") == 2  # at 15 s and 30 s
    assert pauses[:3] == [15.0, 15.0, 10.0]


# The relay: this step in front of another instance of itself


@pytest.fixture
def upstream(tmp_path):
    """Another instance of this step, started as a reader would: 20 tokens a second."""
    port, log = free_port(), tmp_path / "upstream.log"
    process = run_step("stream_server_llm.py", log, port)
    yield f"http://127.0.0.1:{port}", log, process
    if process.poll() is None:
        stop_step(process)


@pytest.fixture
def gateway(serve, app, upstream, monkeypatch):
    monkeypatch.setitem(server.app.config, "UPSTREAM", upstream[0])
    monkeypatch.setenv("UPSTREAM_API_KEY", token_for("gateway"))
    return serve(app)


def test_the_gateway_relays_the_upstreams_answer_token_by_token(gateway, upstream):
    client = client_for(gateway)
    chunks = list(client.chat.completions.create(
        model=completions.MODEL, messages=PROMPT, stream=True, max_tokens=10
    ))
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == EXPECTED[:10]
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(model=completions.MODEL, messages=PROMPT, max_tokens=5)
    assert whole.choices[0].message.content == "".join(EXPECTED[:5])
    # The upstream knows the gateway by the token in UPSTREAM_API_KEY.
    assert "gateway got the whole answer: 10 tokens" in upstream[1].read_text()


def test_the_gateway_passes_each_token_on_before_the_upstream_has_finished(gateway, upstream):
    # The upstream takes about 4 s for the whole answer: a gateway that collected it first
    # would show the first token only after the upstream had logged its end.
    with post(gateway, stream_body(), stream=True) as answer:
        data = events_of(answer)
        next(data)  # the role
        assert json.loads(next(data))["choices"][0]["delta"]["content"] == EXPECTED[0]
        assert "gateway got the whole answer" not in upstream[1].read_text()
        assert list(data)[-1] == "[DONE]"
    assert "gateway got the whole answer" in upstream[1].read_text()


def test_the_upstream_key_never_reaches_a_client(gateway):
    key = os.environ["UPSTREAM_API_KEY"]
    with post(gateway, stream_body(max_tokens=3), stream=True) as answer:
        raw = answer.raw.read()
    assert b"[DONE]" in raw
    assert key not in raw.decode() and key not in str(answer.headers)


def test_a_client_that_leaves_the_gateway_stops_the_upstream(gateway, upstream):
    with post(gateway, stream_body(), user="User1", stream=True) as answer:
        data = events_of(answer)
        for _ in range(4):  # the role and three tokens
            next(data)
    wait_until(lambda: "gateway left after" in upstream[1].read_text())
    generated = status(upstream[0])
    assert generated["generating"] == 0
    assert generated["tokens_generated"] < len(EXPECTED)  # it stopped early


def test_the_gateway_lists_the_upstreams_models(gateway, upstream):
    assert [model.id for model in client_for(gateway).models.list()] == [completions.MODEL]
    assert '"GET /v1/models HTTP/1.1" 200' in upstream[1].read_text()


def test_an_unknown_model_at_the_upstream_is_a_404_through_the_gateway(gateway):
    with pytest.raises(openai.NotFoundError):
        client_for(gateway).chat.completions.create(model="gpt-9", messages=PROMPT)


def test_an_upstream_that_dies_mid_stream_is_an_error_event(gateway, upstream):
    with pytest.raises(openai.APIError) as raised:
        for number, _ in enumerate(client_for(gateway).chat.completions.create(
            model=completions.MODEL, messages=PROMPT, stream=True
        )):
            if number == 2:
                upstream[2].kill()
    assert "upstream" in raised.value.message
    wait_until(lambda: status(gateway)["generating"] == 0)


@pytest.mark.parametrize(("key", "said"), [(None, "is not set"), ("wrong", "was refused")])
def test_an_upstream_that_refuses_the_gateways_key_is_a_502_that_names_it(
    gateway, monkeypatch, key, said
):
    # Before, the client read the upstream's words: "send your API key as 'Authorization:...'".
    if key is None:
        monkeypatch.delenv("UPSTREAM_API_KEY")
    else:
        monkeypatch.setenv("UPSTREAM_API_KEY", key)
    with pytest.raises(openai.InternalServerError) as raised:
        client_for(gateway).chat.completions.create(model=completions.MODEL, messages=PROMPT)
    assert raised.value.status_code == 502
    refused = "the upstream model server refused this gateway: its UPSTREAM_API_KEY"
    assert raised.value.body["message"] == f"{refused} {said}"


def test_an_upstream_that_is_down_is_a_502(serve, app, monkeypatch):
    monkeypatch.setitem(server.app.config, "UPSTREAM", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(openai.InternalServerError) as raised:
        client_for(serve(app)).chat.completions.create(model="any", messages=PROMPT)
    assert raised.value.status_code == 502
    assert raised.value.body["type"] == "server_error"


def test_an_upstream_that_stays_silent_is_a_504(serve, app, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setitem(server.app.config, "UPSTREAM", address)
        monkeypatch.setattr(completions, "UPSTREAM_TIMEOUT", 0.5)
        with pytest.raises(openai.InternalServerError) as raised:
            client_for(serve(app)).chat.completions.create(model="any", messages=PROMPT)
    assert raised.value.status_code == 504


# Bad input: OpenAI's error shape, never a traceback


GOOD = {"model": completions.MODEL, "messages": PROMPT}
BAD_BODIES = [
    ({**GOOD, "model": None}, 400, "model"),
    ({**GOOD, "model": 5}, 400, "model"),
    ({**GOOD, "model": "gpt-9"}, 404, "model"),
    ({**GOOD, "messages": []}, 400, "messages"),
    ({**GOOD, "messages": "hi"}, 400, "messages"),
    ({**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0]"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
    ({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0]"),
    ({**GOOD, "messages": [PROMPT[0]] * 257}, 400, "messages"),
    ({**GOOD, "stream": "yes"}, 400, "stream"),
    ({**GOOD, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ({**GOOD, "stream_options": "yes"}, 400, "stream_options"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 1.5}, 400, "max_tokens"),
    ({**GOOD, "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    ([1, 2], 400, None),
    ("just a string", 400, None),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD_BODIES)
def test_a_bad_body_gets_an_openai_shaped_error(url, body, code, param):
    answer = post(url, body)
    assert answer.status_code == code, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert status(url)["generating"] == 0


@pytest.mark.parametrize(
    ("data", "headers", "code"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b"[" * 100_00, {"Content-Type": "application/json"}, 400),
        (b'{"model": "x"}', {"Content-Type": "text/plain"}, 415),
        (b"x" * (65 * 1024), {"Content-Type": "application/json"}, 413),
        (json.dumps(GOOD).encode(), {"Content-Type": "application/json", "Authorization": ""},
         401),
        (json.dumps(GOOD).encode(), {"Content-Type": "application/json",
                                     "Authorization": f"Bearer {token_for(key=b'x' * 64)}"}, 401),
    ],
    ids=["not JSON", "nested too deep", "not JSON type", "too large", "no key", "forged key"],
)
def test_a_bad_request_gets_an_openai_shaped_error(url, data, headers, code):
    headers = {**bearer(token_for("Alice")), **headers}
    answer = requests.post(f"{url}/v1/chat/completions", data=data, headers=headers,
                           timeout=WAIT)
    assert answer.status_code == code, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in answer.text


def test_other_routes_and_methods_answer_in_openai_shape(url):
    for answer in (requests.get(f"{url}/v1/nothing", timeout=WAIT),
                   requests.get(f"{url}/v1/chat/completions", timeout=WAIT)):
        assert answer.status_code in (404, 405)
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_the_page_and_token_route_are_served(url):
    assert "EventStreamParser" in requests.get(url, timeout=WAIT).text
    minted = requests.post(f"{url}/generate_token", json={"user_id": "User1"}, timeout=WAIT)
    assert minted.status_code == 200 and minted.json()["access_token"]


# The step's client


def test_the_client_prints_the_answer_and_its_numbers(url, capsys):
    assert stream_client_llm.main(["--url", url, "--token", token_for("Alice"),
                                   "Why stream an answer?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("".join(EXPECTED))
    assert f", {len(EXPECTED)} tokens, " in out and "first token after" in out


def test_the_client_reads_the_prompt_from_stdin(url, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Why stream an answer?"))
    assert stream_client_llm.main(["--url", url, "--token", token_for("Alice"),
                                   "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("".join(EXPECTED[:3]) + "\n")


def test_ctrl_c_in_the_client_stops_the_server(url, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=server.__name__)
    monkeypatch.setitem(server.app.config, "TOKENS_PER_SECOND", 20)  # real pauses
    printed = []

    def print_then_interrupt(*args, **kwargs):  # Ctrl-C as the third token is shown
        printed.append(args)
        if len(printed) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream_client_llm, "print", print_then_interrupt, raising=False)
    result = stream_client_llm.main(["--url", url, "--token", token_for("User1"), "hi"])
    assert result == 130
    assert printed[-1] == ("\n(stopped after 3 tokens)",)
    wait_until(lambda: any("User1 left after" in m for m in caplog.messages))
    assert status(url)["generating"] == 0


def test_the_client_escapes_control_characters(url, capsys, monkeypatch):
    monkeypatch.setattr(completions, "SENTENCES", ["Red \x1b[31m alert\x07."] * 8)
    assert stream_client_llm.main(["--url", url, "--token", token_for("Alice"), "x"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31m" in out


def test_the_client_says_what_a_refusal_means(url, capsys):
    assert stream_client_llm.main(["--url", url, "--token", "nonsense", "hi"]) == 1
    assert capsys.readouterr().err == "error: server answered 401: the token is malformed\n"


def test_the_client_says_when_the_events_are_not_openais(serve, capsys, monkeypatch):
    import stream_server_sse

    monkeypatch.setattr(stream_server_sse, "sleep", lambda seconds: None)
    monkeypatch.setattr(stream_client_llm.requests, "post", fake_post(serve(stream_server_sse.app)))
    assert stream_client_llm.main(["--url", "http://127.0.0.1:1", "--token", "x", "hi"]) == 1
    assert capsys.readouterr().err == (
        "error: an event is no chat.completion.chunk: Start it with: python stream_server_llm.py\n"
    )


def fake_post(base: str):
    """requests.post, sent as a GET to step 4's /tokens: events, but not OpenAI's."""
    def post(url, **options):
        options.pop("json")
        return requests.get(f"{base}/tokens", **options)
    return post


def test_the_client_without_a_server_names_the_one_to_start(capsys):
    assert stream_client_llm.main(["--url", f"http://127.0.0.1:{free_port()}", "hi"]) == 1
    assert "Start it with: python stream_server_llm.py" in capsys.readouterr().err


def test_https_with_cert_and_key(tls, capsys):
    with https_step("stream_server_llm.py", tls) as base:
        arguments = ["--url", base, "--cacert", tls.ca_file, "--max-tokens", "2", "hi"]
        assert stream_client_llm.main(arguments) == 0
    assert "2 tokens" in capsys.readouterr().out


def test_the_official_client_example_runs(serve, app):
    command = [sys.executable, "examples/openai_client.py", serve(app)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(completions.StandInModel(1, 0).answer(
        "Why stream an answer?")) + "\n"


def test_nothing_happens_at_import():
    assert only_help("stream_server_llm.py") and only_help("stream_client_llm.py")


# Through deploy/nginx.conf


def test_tokens_pass_through_nginx_one_by_one_and_uncompressed(url, nginx, gated):
    proxy = nginx(port_of(url))
    headers = {**bearer(token_for("Alice")), "Accept-Encoding": "gzip, deflate, br"}
    with requests.post(f"{proxy.url}/v1/chat/completions", json=stream_body(), headers=headers,
                       stream=True, timeout=WAIT) as answer:
        assert answer.status_code == 200, answer.text
        assert answer.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Encoding" not in answer.headers
        data = events_of(answer)
        assert json.loads(next(data))["choices"][0]["delta"]["role"] == "assistant"
        for number in range(2):
            gated.wait_for_pause()  # the app holds the next token back: the last one came alone
            gated.let_one_through()
            assert json.loads(next(data))["choices"][0]["delta"]["content"] == EXPECTED[number]
        gated.open()
        assert list(data)[-1] == "[DONE]"


def test_a_client_that_leaves_nginx_stops_the_generation(url, nginx, gated):
    proxy = nginx(port_of(url))
    before = status(url)["tokens_generated"]
    body = json.dumps(stream_body()).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += f"Content-Type: application/json\r\nAuthorization: Bearer {token_for()}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as sock:
        sock.sendall(head.encode() + body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        gated.wait_for_pause()
        # Reset, not closed: nginx's next write to this client fails at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    # nginx notices that its client has gone when it writes to it: here, the next token.
    # Then it logs the request and closes its connection to the app.
    gated.let_one_through()
    wait_until(lambda: "/v1/chat/completions" in access_log(proxy))
    gated.open()  # the app sees nginx hang up before the token after it
    wait_until(lambda: status(url)["generating"] == 0)
    assert status(url)["tokens_generated"] - before <= 1


def access_log(proxy) -> str:
    return (proxy.prefix / "logs" / "access.log").read_text()


# Under gunicorn's gevent worker


def test_200_paced_completions_at_once_all_complete_on_one_gevent_worker(gunicorn):
    env = {"LLM_TOKENS_PER_SECOND": "10", "LLM_DELAY": "0.5"}  # about 2.5 s each
    app = gunicorn("stream_server_llm", "gevent", workers=1, env=env)
    results: list[str] = []

    def complete(number: int) -> None:
        with post(app.url, stream_body(max_tokens=20), user=f"User{number}", stream=True) as a:
            results.append(list(events_of(a))[-1] if a.status_code == 200 else a.text)

    threads = [threading.Thread(target=complete, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert results == ["[DONE]"] * 200
    assert status(app.url)["tokens_generated"] == 200 * 20


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--upstream", "nonsense"], "--upstream takes a server's http(s) base URL"),
        (["--tokens-per-second", "0"], "--tokens-per-second takes 0.1 to 10000"),
        (["--first-token-delay", "-1"], "--first-token-delay 0 to 600"),
        (["--cert", "missing.pem"], "--cert and --key go together"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(flags, message):
    command = [sys.executable, "stream_server_llm.py", *flags]
    env = {**os.environ, "JWT_SECRET_KEY": TEST_KEY.decode()}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=WAIT)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
