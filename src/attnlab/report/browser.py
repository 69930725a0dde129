"""Open an HTML report in a real headless Chromium and record what went wrong.

Static checks (escaping, no ``http://`` substrings) cannot prove that a browser renders the
plots or runs nothing; this module asks one. It speaks the Chrome DevTools Protocol (CDP)
over ``--remote-debugging-pipe``: the browser reads commands from its fd 3 and writes
replies and events to its fd 4, each a JSON object ended by a NUL byte, so the standard
library is enough (no websocket client, no Selenium, no Playwright).

>>> check = open_in_browser("report.html", screenshot="report.png")  # doctest: +SKIP
>>> check.problems                                                    # doctest: +SKIP
[]
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BrowserCheck", "BrowserNotFound", "find_browser", "open_in_browser"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

# Everything that makes Chromium talk to the network on its own (updates, Safe Browsing,
# metrics, sync, translate, ...) is off, so every request recorded comes from the page.
# The host-resolver rule also makes any name lookup fail at once: a page that asks for
# http://... is still recorded (requestWillBeSent fires first) but never reaches a network,
# and an offline CI machine cannot stall on DNS.
_FLAGS = (
    "--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-client-side-phishing-detection",
    "--safebrowsing-disable-auto-update", "--disable-domain-reliability", "--no-pings",
    "--disable-breakpad", "--metrics-recording-only", "--disable-dev-shm-usage",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", "--mute-audio",
)

# What a figure draws with: an <svg> holding none of these shows nothing.
_PAGE_JS = """(() => {
  const drawn = 'path,rect,image,text,line,polyline,polygon,circle,ellipse,use';
  const figures = [...document.querySelectorAll('figure > svg, img')].map(el => {
    const r = el.getBoundingClientRect(), tag = el.tagName.toLowerCase();
    return {tag, width: r.width, height: r.height,
            drawn: tag === 'svg' ? el.querySelectorAll(drawn).length : null,
            loaded: tag === 'img' ? el.complete && el.naturalWidth > 0 : null};
  });
  return {figures, text: document.body ? document.body.innerText : '',
          scripts: document.scripts.length};
})()"""
# Two animation frames after load: layout and the first paint are done before we measure.
_SETTLE_JS = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


class BrowserNotFound(RuntimeError):
    """No Chromium-family browser to run (see :func:`find_browser`)."""


@dataclass
class BrowserCheck:
    """What one page load showed; :attr:`problems` lists everything wrong with it."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    text: str = ""
    scripts: int = 0
    screenshot: Path | None = None

    @property
    def problems(self) -> list[str]:
        out = [f"console: {m}" for m in self.console_errors]
        out += [f"uncaught exception: {m}" for m in self.exceptions]
        out += [f"network request: {u}" for u in self.requests]
        out += [f"dialog: {m}" for m in self.dialogs]
        for i, f in enumerate(self.figures):
            what = f"figure {i} (<{f['tag']}>, {f['width']:g}x{f['height']:g})"
            if f["width"] <= 0 or f["height"] <= 0:
                out.append(f"{what} has zero size")
            if f["tag"] == "svg" and not f["drawn"]:
                out.append(f"{what} draws nothing (no path/rect/text/... elements)")
            if f["tag"] == "img" and not f["loaded"]:
                out.append(f"{what} did not load")
        return out


def find_browser(browser: str | None = None) -> str:
    """``browser``, else ``$ATTNLAB_CHROMIUM``, else the first of chromium,
    chromium-browser, google-chrome on PATH; raises :class:`BrowserNotFound`."""
    wanted = [browser] if browser else (
        [os.environ["ATTNLAB_CHROMIUM"]] if os.environ.get("ATTNLAB_CHROMIUM") else _CANDIDATES)
    for name in wanted:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotFound(
        f"browser: expected one of {', '.join(wanted)} (an executable path or a name on PATH; "
        "set ATTNLAB_CHROMIUM or apt-get install chromium), found none")


class _Cdp:
    """CDP client over the pipe; events go to ``on_event`` while we wait for replies."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float, on_event, log: Path):
        self.w, self.r, self.deadline, self.on_event, self.log = (
            write_fd, read_fd, deadline, on_event, log)
        self.buf, self.next_id, self.replies = b"", 0, {}

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        i = self.send(method, params, session)
        self.pump(lambda: i in self.replies, method)
        reply = self.replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"browser: {method} failed: {reply['error']}")
        return reply.get("result", {})

    def pump(self, done, what: str, until: float | None = None) -> None:
        """Read messages until ``done()``; or, with ``until``, until that time passes."""
        while not done():
            end = min(self.deadline, until) if until is not None else self.deadline
            left = end - time.monotonic()
            if left <= 0:
                if until is not None and until < self.deadline:
                    return
                raise TimeoutError(f"browser: no answer to {what} in time{self._tail()}")
            if not select.select([self.r], [], [], left)[0]:
                continue
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"browser: exited while waiting for {what}{self._tail()}")
            self.buf += chunk
            *msgs, self.buf = self.buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    self.replies[msg["id"]] = msg
                else:
                    self.on_event(msg)

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return f"; browser stderr ends:\n{text[-1500:]}" if text else ""


def _fds_to_3_and_4(cmd_r: int, res_w: int):
    """preexec_fn: the child's fd 3 reads our commands, its fd 4 writes the replies."""
    def setup():
        # Move both ends above 4 first so that neither dup2 overwrites the other one.
        a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)
    return setup


def open_in_browser(html_path, *, screenshot=None, width: int = 1280, height: int = 800,
                    timeout: float = 60.0, browser: str | None = None) -> BrowserCheck:
    """Load ``html_path`` headless and return a :class:`BrowserCheck`.

    Waits for the load event and two animation frames, then a short settle for late
    console messages; writes a full-page PNG to ``screenshot`` when given. ``timeout``
    bounds the whole call: a hung browser raises ``TimeoutError`` and is killed.
    """
    exe = find_browser(browser)
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"html_path: expected an HTML file, {html_path} does not exist")
    url = html_path.as_uri()
    check = BrowserCheck()
    tmp = Path(tempfile.mkdtemp(prefix="attnlab-browser-"))
    log = tmp / "stderr.txt"
    flags = [*_FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--window-size={width},{height}"]
    if os.geteuid() == 0:  # Chromium refuses to start its sandbox as root
        flags.append("--no-sandbox")
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    proc = None
    try:
        with open(log, "wb") as err:
            # A new session: on cleanup one killpg also reaches the renderer/GPU children.
            proc = subprocess.Popen(
                [exe, *flags, "about:blank"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, pass_fds=(3, 4),
                preexec_fn=_fds_to_3_and_4(cmd_r, res_w), start_new_session=True)
        os.close(cmd_r)
        os.close(res_w)
        cmd_r = res_w = -1
        session: list[str] = []
        loaded: list[bool] = []

        def on_event(msg: dict) -> None:
            if session and msg.get("sessionId") != session[0]:
                return
            method, p = msg.get("method"), msg.get("params", {})
            if method == "Page.loadEventFired":
                loaded.append(True)
            elif method == "Page.javascriptDialogOpening":
                # A dialog blocks the page (and its load event) until it is answered.
                check.dialogs.append(f"{p.get('type')}: {p.get('message')}")
                cdp.send("Page.handleJavaScriptDialog", {"accept": False}, session[0])
            elif method == "Runtime.consoleAPICalled" and p.get("type") in (
                    "error", "warning", "assert"):
                args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
                check.console_errors.append(f"console.{p['type']}: {' '.join(args)}")
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                check.exceptions.append(d.get("exception", {}).get("description", d.get("text")))
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                e = p["entry"]
                check.console_errors.append(f"log ({e.get('source')}): {e.get('text')}")
            elif method == "Network.requestWillBeSent":
                req = p["request"]["url"]
                if req.split("#")[0] != url and not req.startswith(("data:", "blob:")):
                    check.requests.append(req)

        cdp = _Cdp(cmd_w, res_r, time.monotonic() + timeout, on_event, log)
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session.append(cdp.call("Target.attachToTarget",
                                {"targetId": target, "flatten": True})["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable", session=session[0])
        nav = cdp.call("Page.navigate", {"url": url}, session[0])
        if nav.get("errorText"):
            raise RuntimeError(f"browser: could not open {url}: {nav['errorText']}")
        cdp.pump(lambda: bool(loaded), "Page.loadEventFired")
        cdp.call("Runtime.evaluate", {"expression": _SETTLE_JS, "awaitPromise": True}, session[0])
        cdp.pump(lambda: False, "late events", until=time.monotonic() + 0.2)
        page = cdp.call("Runtime.evaluate", {"expression": _PAGE_JS, "returnByValue": True},
                        session[0])["result"]["value"]
        check.figures, check.text, check.scripts = page["figures"], page["text"], page["scripts"]
        if screenshot is not None:
            size = cdp.call("Page.getLayoutMetrics", session=session[0])["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": max(width, size["width"]),
                    "height": size["height"], "scale": 1}
            shot = cdp.call("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                       "captureBeyondViewport": True}, session[0])
            check.screenshot = Path(screenshot)
            check.screenshot.write_bytes(base64.b64decode(shot["data"]))
        return check
    finally:
        for fd in (cmd_r, cmd_w, res_r, res_w):
            if fd >= 0:
                os.close(fd)  # closing fd 3's writer also tells the browser to exit
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
