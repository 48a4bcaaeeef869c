"""Step 9's page in a real headless Chromium, against a live server on a free loopback port:
the answer grows token by token, Stop makes the server stop, and the model's text is shown as
text, never parsed as HTML."""

import pytest
import requests
from selenium.webdriver.common.by import By

import completions
import stream_server_llm as server
from helpers import TEST_KEY, WAIT, bearer, save_screenshot, token_for, wait_in_page, wait_until

pytestmark = pytest.mark.step(server)


def text_of(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def status(base: str) -> dict:
    answer = requests.get(f"{base}/status", headers=bearer(token_for()), timeout=WAIT)
    return answer.json()


@pytest.fixture
def base(serve, monkeypatch) -> str:
    monkeypatch.setitem(server.app.config, "JWT_SECRET_KEY", TEST_KEY)
    monkeypatch.setitem(server.app.config, "UPSTREAM", None)
    return serve(server.app)


@pytest.fixture
def page(base, browser):
    browser.get(base)
    return browser


def send(page, prompt: str = "Why stream?") -> None:
    box = page.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    page.find_element(By.ID, "send").click()


def test_the_answer_grows_token_by_token(page, gated):
    tokens = completions.StandInModel(1, 0).answer("Why stream?")
    send(page)
    for shown in range(1, 4):
        gated.wait_for_pause()  # the model is at work on the next token: the page waits
        gated.let_one_through()
        text = "".join(tokens[:shown])
        wait_in_page(page, lambda text=text: text_of(page, "answer") == text.strip(), text)
        assert text_of(page, "tokens") == str(shown)
    gated.open()
    wait_in_page(page, lambda: text_of(page, "status").startswith("done"), "the end")
    assert text_of(page, "answer") == "".join(tokens).strip()
    assert text_of(page, "status") == f"done: {len(tokens)} tokens"
    assert text_of(page, "ttft").endswith(" s")


def test_stop_makes_the_server_stop_generating(page, base, gated):
    before = status(base)["tokens_generated"]
    send(page)
    gated.wait_for_pause()
    gated.let_one_through()
    wait_in_page(page, lambda: text_of(page, "tokens") == "1", "the first token")
    assert status(base)["generating"] == 1
    gated.wait_for_pause()
    page.find_element(By.ID, "stop").click()
    wait_in_page(page, lambda: text_of(page, "status") == "stopped after 1 token", "stopped")
    gated.open()  # the model would go on now, if nobody checked for the reader
    wait_until(lambda: status(base)["generating"] == 0)
    assert status(base)["tokens_generated"] - before <= 2


def test_the_models_text_is_shown_as_text(page, monkeypatch, gated):
    monkeypatch.setattr(completions, "SENTENCES", ['<img src=x onerror="document.title=1">'] * 8)
    gated.open()
    send(page)
    wait_in_page(page, lambda: text_of(page, "status").startswith("done"), "the end")
    assert page.find_elements(By.CSS_SELECTOR, "#answer *") == []
    assert text_of(page, "answer").startswith("<img src=x onerror=")
    assert page.title == "An answer, token by token"


def test_screenshot_of_the_page(page, monkeypatch):
    """For people to look at (test-artifacts/llm_page.png): a real pace, to the end."""
    monkeypatch.setitem(server.app.config, "TOKENS_PER_SECOND", 40)
    monkeypatch.setitem(server.app.config, "DELAY", 0.3)
    send(page, "Why do chat assistants stream their answers?")
    wait_in_page(page, lambda: text_of(page, "status").startswith("done"), "the end")
    assert save_screenshot(page, "llm_page.png")
