"""Open an HTML report in a real headless Chromium and record what went wrong.

Static checks (escaping, no ``http://`` substrings) cannot prove that a browser renders the
plots or runs nothing; this module asks one. It speaks the Chrome DevTools Protocol (CDP)
over ``--remote-debugging-pipe``: the browser reads commands from its fd 3 and writes
replies and events to its fd 4, each a JSON object ended by a NUL byte, so the standard
library is enough (no websocket client, no Selenium, no Playwright). Typical use:
``assert open_in_browser("report.html", screenshot="report.png").problems == []``.
"""

from __future__ import annotations

import base64
import contextlib
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
    env = os.environ.get("ATTNLAB_CHROMIUM")
    where, wanted = (("the browser argument", [browser]) if browser else
                     ("$ATTNLAB_CHROMIUM", [env]) if env else ("PATH", list(_CANDIDATES)))
    for name in wanted:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotFound(
        f"browser: expected {where} to give an executable Chromium ({', '.join(wanted)}), "
        "found none; apt-get install chromium, or set ATTNLAB_CHROMIUM to its path")


class _Cdp:
    """CDP client over the pipe. ``call`` waits for its reply and hands every page event
    that arrives meanwhile to ``on_event(cdp, method, params)``; after ``attach``, commands
    go to the page's session."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float, on_event, log: Path):
        self.w, self.r, self.deadline, self.on_event, self.log = (
            write_fd, read_fd, deadline, on_event, log)
        self.buf, self.next_id, self.replies, self.session = b"", 0, {}, None

    def send(self, method: str, params: dict | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def call(self, method: str, params: dict | None = None) -> dict:
        i = self.send(method, params)
        self.pump(lambda: i in self.replies, method)
        reply = self.replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"browser: {method} failed: {reply['error']}")
        return reply.get("result", {})

    def attach(self) -> None:
        """Open a page target and talk to it through a flattened session from now on."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]

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
            *msgs, self.buf = (self.buf + chunk).split(b"\0")
            for msg in map(json.loads, msgs):
                if "id" in msg:
                    self.replies[msg["id"]] = msg
                elif self.session and msg.get("sessionId") == self.session:
                    self.on_event(self, msg["method"], msg.get("params", {}))

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return f"; browser stderr ends:\n{text[-1500:]}" if text else ""


def _recorder(check: BrowserCheck, url: str, loaded: list):
    """The event handler: fills ``check``; ``loaded`` gets an item at the load event."""
    def on_event(cdp: _Cdp, method: str, p: dict) -> None:
        if method == "Page.loadEventFired":
            loaded.append(True)
        elif method == "Page.javascriptDialogOpening":
            # A dialog blocks the page (and its load event) until it is answered.
            check.dialogs.append(f"{p.get('type')}: {p.get('message')}")
            cdp.send("Page.handleJavaScriptDialog", {"accept": False})
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in p.get("args", [])]
            check.console_errors.append(f"console.{p['type']}: {' '.join(args)}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            check.exceptions.append(d.get("exception", {}).get("description", d.get("text")))
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            e = p["entry"]  # e.g. "Failed to load resource", CSP and security errors
            check.console_errors.append(f"log ({e.get('source')}): {e.get('text')}")
        elif method == "Network.requestWillBeSent":
            req = p["request"]["url"]
            if req.split("#")[0] != url and not req.startswith(("data:", "blob:")):
                check.requests.append(req)
    return on_event


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
    # Crash reports and caches go to ~/.config, ~/.cache: here into the throwaway folder too.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp), "XDG_CACHE_HOME": str(tmp)}
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    proc = None
    try:
        with open(log, "wb") as err:
            # A new session: on cleanup one killpg also reaches the renderer/GPU children.
            proc = subprocess.Popen(
                [exe, *flags, "about:blank"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, pass_fds=(3, 4), env=env,
                preexec_fn=_fds_to_3_and_4(cmd_r, res_w), start_new_session=True)
        for fd in (cmd_r, res_w):  # the child's ends: closed here, EOF reaches us if it dies
            os.close(fd)
        cmd_r = res_w = -1
        loaded: list[bool] = []
        cdp = _Cdp(cmd_w, res_r, time.monotonic() + timeout, _recorder(check, url, loaded), log)
        cdp.attach()
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable")
        # The viewport itself is width x height (--window-size also counts the window frame).
        cdp.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        nav = cdp.call("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise RuntimeError(f"browser: could not open {url}: {nav['errorText']}")
        cdp.pump(lambda: bool(loaded), "Page.loadEventFired")
        cdp.call("Runtime.evaluate", {"expression": _SETTLE_JS, "awaitPromise": True})
        cdp.pump(lambda: False, "late events", until=time.monotonic() + 0.2)
        page = cdp.call("Runtime.evaluate",
                        {"expression": _PAGE_JS, "returnByValue": True})["result"]["value"]
        check.figures, check.text, check.scripts = page["figures"], page["text"], page["scripts"]
        if screenshot is not None:
            # Clip to the whole content: the PNG holds the full page, not just the viewport.
            size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": max(width, size["width"]),
                    "height": size["height"], "scale": 1}
            shot = cdp.call("Page.captureScreenshot",
                            {"format": "png", "clip": clip, "captureBeyondViewport": True})
            check.screenshot = Path(screenshot)
            check.screenshot.write_bytes(base64.b64decode(shot["data"]))
        return check
    finally:
        _close(proc, cmd_w)
        for fd in (cmd_r, cmd_w, res_r, res_w):
            if fd >= 0:
                os.close(fd)
        for _ in range(10):  # the crash handler, out of our process group, exits just after
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                break
            time.sleep(0.1)


def _close(proc: subprocess.Popen | None, cmd_w: int) -> None:
    """Ask the browser to quit (it then reaps its renderer and GPU processes), then kill
    its whole process group whatever happened, so nothing outlives the call."""
    if proc is None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        os.set_blocking(cmd_w, False)  # a hung browser with a full pipe must not block us
        os.write(cmd_w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        proc.wait(timeout=3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
