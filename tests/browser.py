"""A real browser for tests: headless Chromium (Debian's `chromium` package) driven over the DevTools
protocol with a small websocket client, so a test sees a page as a person would.

What is covered: every request the page makes (URL), console errors, uncaught script errors and
failed loads; JavaScript expressions evaluated in the page once it is ready; a PNG screenshot.
Offline: the browser gets a proxy on a dead loopback port and a resolver that finds no host name, so
nothing outside 127.0.0.1 can load; tests still assert on the recorded URLs that nothing tried.
What is not covered: clicks and typing (a test navigates by URL), more than one tab at a time.

    with Browser() as browser:
        visit = browser.visit(url, ready="document.querySelectorAll('svg').length > 0")
        assert visit.ready and not visit.errors
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import connect

# A port nothing listens on (discard); with it as the proxy, every non-loopback request fails.
DEAD_PROXY = "127.0.0.1:9"
LOCAL = re.compile(r"^(file:|data:|blob:|about:|chrome-error:|https?://(127\.0\.0\.1|localhost)(:\d+)?[/?#]|"
                   r"https?://(127\.0\.0\.1|localhost)(:\d+)?$)")


def chromium_path() -> str | None:
    """The Chromium binary on PATH (Debian: `apt-get install chromium`), or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Visit:
    """What one page load did."""

    url: str
    ready: bool  # the ready expression was true before the timeout
    seconds: float
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    values: dict[str, object] = field(default_factory=dict)  # the evaluate expressions' results

    @property
    def outside(self) -> list[str]:
        """Requests to anything but this machine (must be empty for an offline page)."""
        return [u for u in self.requests if not LOCAL.match(u)]


class Browser:
    """One headless Chromium process and a DevTools connection to it (a context manager)."""

    def __init__(self, offline: bool = True, width: int = 1280, height: int = 1600, timeout: float = 30):
        self.offline, self.width, self.height, self.timeout = offline, width, height, timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        binary = chromium_path()
        if binary is None:
            raise FileNotFoundError("chromium is not installed: apt-get install -y chromium")
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        args = [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self._profile.name}",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--metrics-recording-only", f"--window-size={self.width},{self.height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start as root with its sandbox
        if self.offline:
            args[1:1] = [f"--proxy-server={DEAD_PROXY}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._ws = connect(self._devtools_url(), max_size=None, open_timeout=self.timeout)
        return self

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout
        seen = []
        while time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if not line and self._process.poll() is not None:
                break
            seen.append(line)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                # Keep reading Chromium's stderr so a full pipe never blocks it.
                threading.Thread(target=self._process.stderr.read, daemon=True).start()
                return match.group(1)
        self._process.kill()
        raise RuntimeError("chromium did not start:\n" + "".join(seen[-20:]))

    def __exit__(self, *exc) -> None:
        try:
            self._ws.close()
        finally:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._profile.cleanup()

    def _call(self, method: str, params: dict | None = None, session: str | None = None,
              events: list | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to `events`."""
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        while True:
            reply = json.loads(self._ws.recv(timeout=self.timeout))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if events is not None and "method" in reply:
                events.append(reply)

    def visit(self, url: str, ready: str = "document.readyState === 'complete'",
              evaluate: dict[str, str] | None = None, screenshot: Path | None = None,
              settle: float = 0.5) -> Visit:
        """Open `url` in a new tab, wait until the JavaScript expression `ready` is true (or the
        timeout), wait `settle` seconds more for late errors, evaluate each expression, optionally
        save a full-page PNG, close the tab."""
        start = time.monotonic()
        events: list[dict] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                self._call(f"{domain}.enable", session=session, events=events)
            self._call("Page.navigate", {"url": url}, session=session, events=events)
            is_ready = False
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self._eval(ready, session, events):
                    is_ready = True
                    break
                time.sleep(0.2)
            time.sleep(settle)
            values = {name: self._eval(expr, session, events) for name, expr in (evaluate or {}).items()}
            if screenshot is not None:
                shot = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                  session=session, events=events)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            self._call("Target.closeTarget", {"targetId": target})
        requests, errors = _read_events([e for e in events if e.get("sessionId") == session])
        return Visit(url=url, ready=is_ready, seconds=time.monotonic() - start, requests=requests,
                     errors=errors, values=values)

    def _eval(self, expression: str, session: str, events: list) -> object:
        result = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                            session=session, events=events)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")


def _read_events(events: list[dict]) -> tuple[list[str], list[str]]:
    """(request URLs, error lines) from DevTools events."""
    requests, errors = [], []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(f"load failed: {params.get('errorText')} ({params.get('type')})")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append("exception: " + (details.get("exception", {}).get("description") or details.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                 for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
    return requests, errors
