"""A tiny headless-Chromium driver for tests, standard library only.

It speaks the DevTools protocol over `--remote-debugging-pipe`: the browser reads commands on its
fd 3 and writes replies and events on its fd 4, each message one JSON object ended by a NUL byte.
A reader thread routes replies to the waiting command (by id) and events to their page (by
sessionId); every wait has a timeout, so a hung browser fails a test instead of hanging it.

    with Browser() as browser:
        page = browser.open("file:///.../index.html")        # new tab, waits for the load event
        page.wait_for("document.body.dataset.ready === '1'")
        page.evaluate("document.querySelectorAll('tr').length")
        page.goto("#/layer/11")                                # sets location.hash
        page.screenshot("/tmp/shot.png")
        assert page.console_errors == [] and page.requests == []
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# Headless, no sandbox (tests run as root in containers), nothing the browser does on its own
# (extensions, first-run UI, background networking), so page.requests holds only the page's own.
# No --allow-file-access-from-files: a file:// page must work as a user's browser opens it, where
# fetch and XHR of other files are blocked.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--remote-debugging-pipe",
]


class BrowserError(RuntimeError):
    """The browser failed: it did not start, a command failed or timed out, or a page script threw."""


def find_chromium() -> str | None:
    """Path of the Chromium executable (`chromium`, else `chromium-browser`), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def skip_unless_chromium() -> None:
    """In a pytest test or fixture: skip when Chromium is missing, except under CI=true, where fail."""
    import pytest

    if find_chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is not installed, and CI must run the browser tests: apt-get install chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium); under CI=true this fails instead")


class Browser:
    """One headless Chromium process with a fresh profile; use as a context manager."""

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 900,
                 timeout: float = 30.0):
        """executable: Chromium's path (default: find_chromium()); width x height: each tab's viewport
        in CSS pixels; timeout: seconds to wait for any one protocol reply."""
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("Chromium is not installed: no `chromium` or `chromium-browser` on PATH "
                               "(Debian/Ubuntu: apt-get install chromium)")
        self.size = (width, height)
        self.timeout = timeout  # for each protocol command
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._reply_ready = threading.Condition(self._lock)
        self._pages: dict[str, Page] = {}
        self._dead: str | None = None  # why the connection ended, once it has

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="qsae-chromium-")
        self._stderr = tempfile.TemporaryFile()
        # Our two pipes become the child's fd 3 (commands in) and fd 4 (messages out). They are
        # first copied above fd 10 so that the dup2 onto 3 and 4 cannot overwrite one another.
        cmd_read, self._cmd_write = os.pipe()
        self._msg_read, msg_write = os.pipe()
        child_in = _high_dup(cmd_read)
        child_out = _high_dup(msg_write)
        os.close(cmd_read)
        os.close(msg_write)

        def wire_pipes():  # runs in the child between fork and exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        try:
            # close_fds=False: closing happens after preexec_fn and would close 3 and 4 again. Python's
            # own fds are non-inheritable (PEP 446), so nothing else leaks into the browser.
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=self._stderr, close_fds=False, preexec_fn=wire_pipes)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._reader = threading.Thread(target=self._read_loop, name="chromium-reader", daemon=True)
        self._reader.start()
        try:
            self.version = self.send("Browser.getVersion")["product"]
        except BrowserError as error:
            self.close()
            raise BrowserError(f"Chromium did not start: {error}") from None

    def close(self) -> None:
        """Ask the browser to quit, kill it if it does not, and remove its profile. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None and self._dead is None:
            try:
                self.send("Browser.close", timeout=5)
            except BrowserError:
                pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        self._reader.join(timeout=5)  # it sees end-of-file once the browser is gone
        for fd in (self._cmd_write, self._msg_read):
            try:
                os.close(fd)
            except OSError:
                pass
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def open(self, url: str, *, timeout: float = 30.0) -> Page:
        """A new tab, attached with its console, log and network events recorded, navigated to url."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        # The viewport itself: --window-size leaves headless window decorations to guess at.
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.size[0], "height": self.size[1], "deviceScaleFactor": 1, "mobile": False})
        page.goto(url, timeout=timeout)
        return page

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one protocol command and return its result; raises BrowserError on error or timeout."""
        with self._lock:
            if self._dead:
                raise BrowserError(f"{method}: the browser is gone ({self._dead})")
            self._next_id += 1
            message_id = self._next_id
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        except OSError as error:
            raise BrowserError(f"{method}: cannot write to the browser ({error})") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._lock:
            while message_id not in self._replies:
                left = deadline - time.monotonic()
                if self._dead or left <= 0:
                    why = self._dead or f"no reply in {timeout or self.timeout:.0f} s"
                    raise BrowserError(f"{method}: {why}{self._stderr_tail()}")
                self._reply_ready.wait(left)
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".rstrip())
        return reply.get("result", {})

    def _read_loop(self) -> None:
        buffer = b""
        try:
            while chunk := os.read(self._msg_read, 1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    self._dispatch(json.loads(raw))
            reason = "the browser closed its pipe (exited or crashed)"
        except (OSError, ValueError) as error:
            reason = f"reading from the browser failed: {error!r}"
        with self._lock:
            self._dead = reason
            self._reply_ready.notify_all()

    def _dispatch(self, message: dict) -> None:
        if "id" in message:
            with self._lock:
                self._replies[message["id"]] = message
                self._reply_ready.notify_all()
        elif (page := self._pages.get(message.get("sessionId"))) is not None:
            page._on_event(message["method"], message.get("params", {}))

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").splitlines()
            tail = [line for line in lines if "dbus" not in line][-10:]  # no D-Bus in containers: noise
        except (OSError, ValueError):
            return ""
        return "\nChromium stderr:\n" + "\n".join(tail) if tail else ""


class Page:
    """One tab. console_errors and requests accumulate from the moment the tab opens."""

    def __init__(self, browser: Browser, session: str):
        self.browser = browser
        self.session = session
        self.console_errors: list[str] = []  # console.error/warn, uncaught exceptions, error/warning log entries
        self.requests: list[str] = []  # URLs the page requested whose scheme is not file: or data:
        self._loaded = threading.Event()

    def send(self, method: str, params: dict | None = None, *, timeout: float | None = None) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, *, timeout: float = 30.0) -> None:
        """Navigate to url and wait for its load event; "#..." sets location.hash instead and waits for
        the hashchange event, so the page's own hashchange handlers have run when this returns. (A full
        URL that changes only the fragment navigates within the document and waits for nothing.)"""
        if url.startswith("#"):
            self.evaluate(f"""new Promise(resolve => {{
                if (location.hash === {json.dumps(url)}) return resolve(true);
                addEventListener("hashchange", () => resolve(true), {{once: true}});
                location.hash = {json.dumps(url)};
            }})""", timeout=timeout)
            return
        self._loaded.clear()
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        # No loaderId: a same-document navigation (only the fragment changed), which fires no load event.
        if "loaderId" in result and not self._loaded.wait(timeout):
            raise BrowserError(f"{url} did not finish loading in {timeout:.0f} s")

    def evaluate(self, expression: str, *, timeout: float = 30.0):
        """The value of a JS expression (JSON-like values; a promise is awaited); raises on a JS exception."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"JS error in {expression[:200]!r}: {_exception_text(result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0, *, interval: float = 0.05):
        """Poll a JS expression until it is truthy and return its value. Errors while polling (say the
        document is being replaced) count as falsy; on timeout raises with the last value or error
        and the console errors so far."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
                if last:
                    return last
            except BrowserError as error:
                if self.browser._dead:
                    raise
                last = error
            if time.monotonic() >= deadline:
                raise BrowserError(f"timed out after {timeout} s waiting for {expression!r}; last value: {last!r}; "
                                   f"console errors: {self.console_errors}")
            time.sleep(interval)

    def screenshot(self, path: str | os.PathLike, *, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or of the whole page) to path and return the path."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def _on_event(self, method: str, params: dict) -> None:  # called on the reader thread
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(f"uncaught: {_exception_text(params['exceptionDetails'])}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            self.console_errors.append(f"log.{entry['level']}: {entry['text']}{where}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                self.requests.append(url)


def _high_dup(fd: int) -> int:
    """A copy of fd numbered 10 or above, closed on exec."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def _remote_text(arg: dict) -> str:
    """Readable text of a console argument (a Runtime.RemoteObject)."""
    if "value" in arg:
        return arg["value"] if isinstance(arg["value"], str) else json.dumps(arg["value"])
    preview = arg.get("preview")
    if preview and arg.get("subtype") != "error":  # an Error's description carries its stack instead
        inner = ", ".join(f"{p['name']}: {p.get('value', p['type'])}" for p in preview.get("properties", []))
        return f"[{inner}]" if arg.get("subtype") == "array" else f"{{{inner}}}"
    return arg.get("description") or arg.get("unserializableValue") or arg.get("type", "?")


def _exception_text(details: dict) -> str:
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "exception")
