"""The headless-Chromium harness (tests/browser.py) on small pages: values, console errors, requests,
waits and screenshots. Skipped without Chromium, except under CI=true, where its absence fails."""
from __future__ import annotations

import struct

import pytest
from browser import BrowserError


@pytest.fixture(scope="module")
def browser(chromium):
    return chromium


def write_page(tmp_path, body: str) -> str:
    path = tmp_path / "page.html"
    path.write_text(f"<!doctype html><html><head><link rel='icon' href='data:,'></head><body>{body}</body></html>")
    return path.as_uri()


def test_evaluate_returns_values_and_raises_on_js_errors(browser, tmp_path):
    page = browser.open(write_page(tmp_path, "<p id='x'>hello</p>"))
    assert page.evaluate("document.getElementById('x').textContent") == "hello"
    assert page.evaluate("({n: 1.5, list: [1, 'a', null]})") == {"n": 1.5, "list": [1, "a", None]}
    assert page.evaluate("new Promise(resolve => setTimeout(() => resolve(42), 50))") == 42
    assert page.evaluate("undefined") is None
    with pytest.raises(BrowserError, match="nope"):
        page.evaluate("(() => { throw new Error('nope') })()")
    assert page.console_errors == [] and page.requests == []


def test_console_errors_warnings_and_uncaught_exceptions_are_recorded(browser, tmp_path):
    page = browser.open(write_page(tmp_path, """<script>
        console.log("fine"); console.error("broken", 3); console.warn("careful");
        setTimeout(() => { throw new TypeError("uncaught one") }, 0);
    </script>"""))
    page.wait_for("new Promise(resolve => setTimeout(() => resolve(true), 100))")  # the timer has thrown
    errors = page.console_errors
    assert any("broken 3" in e for e in errors), errors
    assert any("careful" in e for e in errors), errors
    assert any("uncaught one" in e for e in errors), errors
    assert not any("fine" in e for e in errors), errors


def test_requests_other_than_file_and_data_are_recorded(browser, tmp_path):
    (tmp_path / "local.js").write_text("window.localRan = true;")
    page = browser.open(write_page(tmp_path, """<script src="local.js"></script>
        <img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
        <img src="http://127.0.0.1:9/x.png">"""))
    assert page.evaluate("window.localRan") is True
    assert page.requests == ["http://127.0.0.1:9/x.png"]


def test_wait_for_and_hash_navigation(browser, tmp_path):
    page = browser.open(write_page(tmp_path, """<script>
        addEventListener("hashchange", () => { document.body.dataset.route = location.hash });
        setTimeout(() => { document.body.dataset.late = "yes" }, 200);
    </script>"""))
    assert page.wait_for("document.body.dataset.late", timeout=10) == "yes"
    page.goto("#/layer/3")
    assert page.evaluate("document.body.dataset.route") == "#/layer/3"  # the page's handler has run
    with pytest.raises(BrowserError, match="timed out.*last value: False"):
        page.wait_for("1 + 1 === 3", timeout=0.3)


def test_screenshot_is_a_png(browser, tmp_path):
    page = browser.open(write_page(tmp_path, "<h1 style='height: 3000px'>tall</h1>"))
    viewport = page.screenshot(tmp_path / "viewport.png")
    full = page.screenshot(tmp_path / "full.png", full_page=True)
    sizes = []
    for path in (viewport, full):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append(struct.unpack(">II", data[16:24]))  # width and height from the IHDR chunk
    assert sizes[0] == (1280, 900) and sizes[1][1] > 3000


def test_a_missing_file_fails_to_open(browser, tmp_path):
    with pytest.raises(BrowserError, match="ERR_FILE_NOT_FOUND"):
        browser.open((tmp_path / "missing.html").as_uri())
