"""Open an HTML report in a real headless Chromium and record what went wrong.

Static checks (escaping, no ``http://`` substrings) cannot prove that a browser renders the
plots or runs nothing; this module asks one. Playwright (the ``viz`` extra) drives the
system's Chromium (Debian's ``chromium``; Playwright's own browser download is never used):
it records console errors, uncaught exceptions, dialogs and every request; a request that
would leave the file system is recorded and aborted, so nothing reaches a network. Typical
use: ``assert open_in_browser("report.html", screenshot="report.png").problems == []``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.util.checks import check_bool, check_float, check_int
from attnlab.util.optional import optional_import

__all__ = ["BrowserCheck", "BrowserNotFound", "find_browser", "open_in_browser"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

# The network is off for the page (see _leaves_the_file) and for Chromium itself: no
# updates, Safe Browsing, metrics, sync or QUIC; any host name lookup fails at once, so an
# offline machine cannot stall on DNS.
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-default-browser-check", "--disable-default-apps", "--disable-extensions",
    "--disable-client-side-phishing-detection", "--safebrowsing-disable-auto-update",
    "--disable-domain-reliability", "--no-pings", "--disable-breakpad",
    "--metrics-recording-only", "--disable-dev-shm-usage",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", "--mute-audio",
)
# What a request may ask for without leaving the file: the file system and inline data.
_LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# What a figure draws with: an <svg> holding none of these shows nothing. Each table is
# named by the id of the <h2> section it is in (the report's sections carry ids).
_PAGE_JS = """(() => {
  const drawn = 'path,rect,image,text,line,polyline,polygon,circle,ellipse,use';
  const figures = [...document.querySelectorAll('figure > svg, img')].map(el => {
    const r = el.getBoundingClientRect(), tag = el.tagName.toLowerCase();
    return {tag, width: r.width, height: r.height,
            drawn: tag === 'svg' ? el.querySelectorAll(drawn).length : null,
            loaded: tag === 'img' ? el.complete && el.naturalWidth > 0 : null};
  });
  const tables = [];
  let section = null;
  for (const el of document.querySelectorAll('h2, table')) {
    if (el.tagName === 'H2') { section = el.id || el.innerText; continue; }
    const r = el.getBoundingClientRect();
    tables.push({section, width: r.width, height: r.height,
                 header: [...el.querySelectorAll('thead th')].map(c => c.innerText),
                 rows: el.querySelectorAll('tbody tr').length});
  }
  return {figures, tables, text: document.body ? document.body.innerText : '',
          scripts: document.scripts.length};
})()"""
# Two animation frames after load: layout and the first paint are done before we measure.
_SETTLE_JS = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


class BrowserNotFound(RuntimeError):
    """No Chromium-family browser, or no Playwright to drive it (see :func:`find_browser`)."""


@dataclass
class BrowserCheck:
    """What one page load showed; :attr:`problems` lists everything wrong with it.

    ``urls`` is every URL the page requested, ``requests`` those that would have left the
    file (not ``file:``, ``data:``, ``blob:``): those were aborted."""

    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
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


def _playwright():
    """``playwright.sync_api`` (an optional package), else :class:`BrowserNotFound`."""
    # The system's chromium is driven: no `playwright install` (a browser download) needed.
    return optional_import("playwright.sync_api", extra="viz", error=BrowserNotFound,
                           purpose="browser: driving the system's chromium")


def find_browser(browser: str | None = None) -> str:
    """The Chromium to drive: ``browser``, else ``$ATTNLAB_CHROMIUM``, else the first of
    chromium, chromium-browser, google-chrome on PATH. Raises :class:`BrowserNotFound`
    when there is none, or when Playwright (which drives it) is not installed."""
    env = os.environ.get("ATTNLAB_CHROMIUM")
    where, wanted = (("the browser argument", [browser]) if browser else
                     ("$ATTNLAB_CHROMIUM", [env]) if env else ("PATH", list(_CANDIDATES)))
    path = next((p for p in map(shutil.which, wanted) if p), None)
    if path is None:
        raise BrowserNotFound(
            f"browser: expected {where} to give an executable Chromium "
            f"({', '.join(wanted)}), found none; apt-get install chromium, or set "
            "ATTNLAB_CHROMIUM to its path")
    _playwright()
    return path


def _leaves_the_file(url: str) -> bool:
    return not url.startswith(_LOCAL_SCHEMES)


def _record(check: BrowserCheck, page) -> None:
    """Hook ``check``'s lists to the page's events; requests off the file are aborted."""
    def on_console(msg) -> None:
        if msg.type in ("error", "warning", "assert"):
            check.console_errors.append(f"console.{msg.type}: {msg.text}")

    def on_dialog(dialog) -> None:  # a dialog blocks the page (and its load) until answered
        check.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_request(request) -> None:
        check.urls.append(request.url)
        if _leaves_the_file(request.url):
            check.requests.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", lambda e: check.exceptions.append(f"{e.name}: {e.message}"))
    page.on("dialog", on_dialog)
    page.on("request", on_request)
    page.route(_leaves_the_file, lambda route: route.abort("blockedbyclient"))


class _Clock:
    """Milliseconds left of the call's ``timeout``, and the step now waited for."""

    def __init__(self, timeout: float):
        self.end, self.step = time.monotonic() + timeout, "the browser's start"

    def ms(self, step: str) -> float:
        self.step = step
        return max(1.0, (self.end - time.monotonic()) * 1000)


def open_in_browser(html_path, *, screenshot=None, width: int = 1280, height: int = 800,
                    timeout: float = 60.0, browser: str | None = None,
                    full_page: bool = True) -> BrowserCheck:
    """Load ``html_path`` headless in a ``width`` x ``height`` viewport and return a
    :class:`BrowserCheck`.

    Waits for the load event and two animation frames, then a short settle for late
    console messages; writes a PNG to ``screenshot`` when given: the whole page
    (``full_page``, at least ``width`` wide), else the viewport alone. ``timeout`` (s)
    bounds the whole call: a hung page raises ``TimeoutError``; the browser is closed and
    its profile removed whatever happens.
    """
    width = check_int("width", width, low=16, high=16384)
    height = check_int("height", height, low=16, high=16384)
    timeout = check_float("timeout", timeout, low=0.1)
    full_page = check_bool("full_page", full_page)
    exe = find_browser(browser)
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"html_path: expected an HTML file, {html_path} does not exist")
    sync_api = _playwright()
    check, clock = BrowserCheck(), _Clock(timeout)
    tmp = Path(tempfile.mkdtemp(prefix="attnlab-browser-"))
    # Crash reports and caches go to ~/.config, ~/.cache: here into the throwaway folder too.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp), "XDG_CACHE_HOME": str(tmp)}
    try:
        with sync_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp / "profile"), executable_path=exe, headless=True, args=list(_FLAGS),
                env=env, viewport={"width": width, "height": height},
                device_scale_factor=1, service_workers="block", timeout=clock.ms("launch"))
            try:
                _load(context, html_path.as_uri(), check, clock)
                if screenshot is not None:
                    check.screenshot = Path(screenshot)
                    context.pages[0].screenshot(path=str(check.screenshot), type="png",
                                                full_page=full_page,
                                                timeout=clock.ms("the screenshot"))
            finally:
                with contextlib.suppress(sync_api.Error):
                    context.close()
    except sync_api.TimeoutError as e:
        raise TimeoutError(f"browser: no answer to {clock.step} in time ({timeout:g} s): "
                           f"{e.message.splitlines()[0]}") from None
    except sync_api.Error as e:
        raise RuntimeError(f"browser: {clock.step} failed: {e.message}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check


def _load(context, url: str, check: BrowserCheck, clock: _Clock) -> None:
    page = context.pages[0] if context.pages else context.new_page()
    _record(check, page)
    page.goto(url, wait_until="load", timeout=clock.ms("the page's load event"))
    page.set_default_timeout(clock.ms("the first paint"))
    page.evaluate(_SETTLE_JS)
    page.wait_for_timeout(200)  # late console messages and requests
    clock.ms("the page's content")
    found = page.evaluate(_PAGE_JS)
    check.figures, check.tables = found["figures"], found["tables"]
    check.text, check.scripts = found["text"], found["scripts"]
