"""Step 4's page in a real headless Chromium, against a live server on a free loopback port."""

import itertools

import pytest
from flask import abort, request
from selenium.webdriver.common.by import By

import stream_server_sse as server
from helpers import save_screenshot, wait_in_page, wait_until

pytestmark = pytest.mark.step(server)


def fill(browser, **fields: str) -> None:
    for element_id, value in fields.items():
        element = browser.find_element(By.ID, element_id.replace("_", "-"))
        element.clear()
        element.send_keys(value)


def feed_ids(browser) -> list[str]:
    rows = browser.find_elements(By.CSS_SELECTOR, "#feed-list li[data-id]")
    return [row.get_attribute("data-id") for row in rows]


def text_of(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


@pytest.fixture
def page(serve, browser):
    browser.get(serve(server.app))
    return browser


def test_feed_events_appear_one_by_one_while_the_stream_runs(page, gated):
    fill(page, feed_count="3", feed_interval="1")
    page.find_element(By.ID, "feed-start").click()
    for shown in (1, 2):
        # The server is paused before the next event: the page shows what came so far.
        wait_in_page(page, lambda shown=shown: len(feed_ids(page)) == shown, f"{shown} events")
        assert feed_ids(page) == [str(n) for n in range(1, shown + 1)]
        assert text_of(page, "feed-status") == "streaming"
        gated.let_one_through()
    wait_in_page(page, lambda: text_of(page, "feed-status") == "ended: 3 events", "the end")
    assert feed_ids(page) == ["1", "2", "3"]


def test_feed_resumes_after_the_server_drops_the_connection(page, drop_connection, monkeypatch):
    drop_connection(at_pause=1)  # after event 1
    monkeypatch.setattr(server, "RETRY_MS", 100)
    fill(page, feed_count="5", feed_interval="1")
    page.find_element(By.ID, "feed-start").click()
    wait_in_page(page, lambda: text_of(page, "feed-status").startswith("ended"), "the end")
    assert feed_ids(page) == ["1", "2", "3", "4", "5"]  # each once: no gap, no duplicate
    notes = [note.text for note in page.find_elements(By.CSS_SELECTOR, "#feed-list li.note")]
    assert notes == [
        "connection lost: the browser will reconnect",
        "reconnected: resuming after #1",
    ]


def test_feed_tries_again_with_the_query_after_eventsource_gives_up(page, drop_connection,
                                                                   monkeypatch):
    drop_connection(at_pause=1)  # after event 1
    monkeypatch.setattr(server, "RETRY_MS", 100)
    first_event, asked = server.first_event, []

    def first_event_or_502() -> int:
        asked.append((request.headers.get("Last-Event-ID"), request.args.get("last_event_id")))
        if request.headers.get("Last-Event-ID"):  # EventSource's own reconnection meets what
            abort(502, "no app instance answered")  # nginx answers while the server restarts
        return first_event()

    monkeypatch.setattr(server, "first_event", first_event_or_502)
    fill(page, feed_count="5", feed_interval="1")
    page.find_element(By.ID, "feed-start").click()
    wait_in_page(page, lambda: text_of(page, "feed-status").startswith("ended"), "the end")
    assert feed_ids(page) == ["1", "2", "3", "4", "5"]  # each once: no gap, no duplicate
    assert asked == [(None, None), ("1", None), (None, "1")]
    notes = [note.text for note in page.find_elements(By.CSS_SELECTOR, "#feed-list li.note")]
    assert notes == [
        "connection lost: the browser will reconnect",
        "the server is away: trying again in 1s",
        "reconnected: resuming after #1",
    ]


def test_a_page_that_is_left_closes_its_feed_at_once(page, gated, caplog):
    caplog.set_level("INFO")
    fill(page, feed_count="100000", feed_interval="1")
    page.find_element(By.ID, "feed-start").click()
    wait_in_page(page, lambda: feed_ids(page) == ["1"], "the first event")
    page.get("about:blank")  # Chromium may keep the page, and its stream, in its cache
    left = "events for User1: client left after event"
    for _ in range(20):  # the stream writes on, an event at a time: a closed connection fails
        gated.let_one_through()
        wait_until(lambda: gated.paused.acquire(blocking=False) or left in caplog.text)
        if left in caplog.text:
            break
    assert left in caplog.text


def test_tokens_appear_word_by_word_through_fetch(page, gated):
    page.find_element(By.ID, "tokens-start").click()
    wait_in_page(page, lambda: text_of(page, "tokens-text") == "Server-Sent", "the first word")
    assert text_of(page, "tokens-status") == "streaming: 1 token"
    gated.let_one_through()
    wait_in_page(
        page, lambda: text_of(page, "tokens-text") == "Server-Sent Events", "the second word"
    )
    gated.open()
    wait_in_page(page, lambda: text_of(page, "tokens-status").startswith("done"), "the end")
    assert text_of(page, "tokens-text") == "".join(server.WORDS).strip()


def test_screenshot_of_the_page(page, monkeypatch):
    """For people to look at (test-artifacts/sse_page.png, and docs/sse_page.png with
    UPDATE_SCREENSHOTS=1): the page's own settings, real pauses, the feed's connection dropped
    once, after event 3, while the text streams beside it."""
    real_sleep, feed_pauses = server.sleep, itertools.count(1)
    interval = float(page.find_element(By.ID, "feed-interval").get_attribute("value"))

    def sleep(seconds: float) -> None:
        # The feed's pauses are its interval long, the text's shorter: only the feed drops.
        if seconds == interval and next(feed_pauses) == 3:
            raise ConnectionResetError("dropped by the test")
        real_sleep(seconds)

    monkeypatch.setattr(server, "sleep", sleep)
    page.find_element(By.ID, "feed-start").click()
    page.find_element(By.ID, "tokens-start").click()
    wait_in_page(page, lambda: text_of(page, "tokens-status").startswith("done"), "the text's end")
    wait_in_page(page, lambda: text_of(page, "feed-status").startswith("ended"), "the feed's end")
    assert save_screenshot(page, "sse_page.png")
