"""A real headless Chromium, driven by Playwright, opens attnlab's HTML report (issue 6, 15).

The report must load with no console errors, no network requests and no dialogs; its
figures and tables must render; hostile dataset strings must show as text. The later tests
feed the checker pages that break each rule, so that a checker that records nothing cannot
pass. Skipped where Playwright or Chromium is missing (CI installs both: the ``viz`` extra
and Debian's ``chromium``, see .ci/run); the argument tests run everywhere.
"""

from __future__ import annotations

import http.server
import struct
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from attnlab.report.browser import BrowserNotFound, find_browser, open_in_browser

try:
    find_browser()
    NO_BROWSER = ""
except BrowserNotFound as e:
    NO_BROWSER = f"no headless browser: {e}"
needs_browser = pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)

XSS_TEXT = "<script>alert(1)</script>"
XSS_CELL = "<img src=x onerror=alert(2)>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _plot(path: Path, kind: str) -> tuple[Path, Path]:
    """A small matplotlib figure saved as SVG and PNG (no pyplot global state)."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if kind == "line":
        ax.plot([0, 1, 2, 3], [1, 3, 2, 4], label="loss")
        ax.legend()
    else:
        ax.imshow([[0.1, 0.9], [0.6, 0.3]], cmap="viridis")
    ax.set_title(f"{kind} <b>&amp;")  # drawn as glyph paths, an escaping check all the same
    svg, png = path.with_suffix(".svg"), path.with_suffix(".png")
    fig.savefig(svg, metadata={"Date": None})
    fig.savefig(png, dpi=60)
    return svg, png


def _page(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}"
                    "</body></html>", encoding="utf-8")
    return path


@needs_browser
def test_report_renders_cleanly_in_a_browser(tmp_path):
    from attnlab.report.document import Report

    report = Report("Browser check")
    report.section("Leaderboard", "leaderboard")
    report.table(["token", "count"], [[XSS_CELL, 3], ["plain", 5]], caption="tokens")
    report.section("Data")
    report.paragraph(f"A review from the dataset: {XSS_TEXT} see https://x.example")
    report.figure(*_plot(tmp_path / "line", "line"), caption="a line plot")
    report.figure(*_plot(tmp_path / "heat", "heat"), caption="a heatmap")
    html = report.write(tmp_path / "out")["html"]

    # A short viewport: the screenshot must still hold the whole page.
    check = open_in_browser(html, screenshot=tmp_path / "shot.png", height=500, timeout=60)

    assert check.problems == []
    assert check.console_errors == [] and check.exceptions == []
    assert check.dialogs == [] and check.requests == []
    # The page itself was requested (so the recorder records), and nothing off the file.
    assert Path(html).resolve().as_uri() in check.urls
    assert all(u.startswith(("file://", "data:")) for u in check.urls), check.urls
    assert check.scripts == 0
    assert XSS_TEXT in check.text and XSS_CELL in check.text
    assert "https://x.example" in check.text  # written &#58;// in the HTML, same on screen
    [table] = check.tables
    assert table["section"] == "leaderboard" and table["header"] == ["token", "count"]
    assert table["rows"] == 2 and table["width"] > 100 and table["height"] > 40
    assert [f["tag"] for f in check.figures] == ["svg", "svg"]
    for fig in check.figures:
        assert fig["width"] > 100 and fig["height"] > 50 and fig["drawn"] > 5
    width, height = _png_size(check.screenshot)
    assert width == 1280 and height > 900  # two figures and a table: about 1080 px
    assert check.screenshot.stat().st_size > 10_000


@needs_browser
def test_viewport_screenshot_has_the_requested_size(tmp_path):
    page = _page(tmp_path, "<h1>hello</h1>" + "<p>line</p>" * 100)  # taller than the view
    check = open_in_browser(page, screenshot=tmp_path / "v.png", width=640, height=360,
                            full_page=False)
    assert _png_size(check.screenshot) == (640, 360)
    full = open_in_browser(page, screenshot=tmp_path / "f.png", width=640, height=360)
    w, h = _png_size(full.screenshot)
    assert w == 640 and h > 360 * 2


@needs_browser
def test_network_request_is_recorded_and_never_sent(tmp_path):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/x.png"
        check = open_in_browser(_page(tmp_path, f'<img src="{url}">'), timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert check.requests == [url]
    assert hits == []  # aborted in the browser: the loopback server saw nothing
    assert any("network request" in p for p in check.problems)
    assert any("did not load" in p for p in check.problems)


@needs_browser
def test_console_error_and_exception_are_recorded(tmp_path):
    check = open_in_browser(_page(tmp_path, '<script>console.error("boom")</script>'
                                            '<script>null.x</script>'))
    assert check.console_errors == ["console.error: boom"]
    assert len(check.exceptions) == 1 and check.exceptions[0].startswith("TypeError: ")
    assert check.scripts == 2


@needs_browser
def test_dialog_is_recorded_and_dismissed(tmp_path):
    # Without dismissal the alert would block the load event and the call would time out.
    check = open_in_browser(_page(tmp_path, "<script>alert(3)</script><p>after</p>"),
                            timeout=20)
    assert check.dialogs == ["alert: 3"]
    assert "after" in check.text


@needs_browser
def test_empty_figure_is_a_problem(tmp_path):
    check = open_in_browser(_page(tmp_path, '<figure><svg width="0" height="0"></svg></figure>'))
    assert check.figures == [{"tag": "svg", "width": 0, "height": 0, "drawn": 0,
                              "loaded": None}]
    assert any("zero size" in p for p in check.problems)
    assert any("draws nothing" in p for p in check.problems)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (Linux /proc)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if text in line:
            out.append(line)
    return out


@needs_browser
def test_hung_page_times_out_and_leaves_nothing_behind(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the profile goes
    with pytest.raises(TimeoutError, match="no answer to the page's load event in time"):
        open_in_browser(_page(tmp_path, "<script>while (true) {}</script>"), timeout=5)
    assert list(scratch.iterdir()) == []
    assert _processes_mentioning(str(scratch)) == []  # no chromium left with that profile


def test_missing_browser_is_named(tmp_path):
    with pytest.raises(BrowserNotFound, match="no-such-browser-attnlab"):
        open_in_browser(_page(tmp_path, ""), browser="no-such-browser-attnlab")


def test_missing_playwright_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "playwright", None)  # import playwright fails
    with pytest.raises(BrowserNotFound, match=r"needs `playwright`, which is not installed.*\[viz\]"):
        find_browser(sys.executable)  # any executable: the browser is found, the driver not
    with pytest.raises(BrowserNotFound, match="playwright"):
        open_in_browser(_page(tmp_path, ""), browser=sys.executable)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"width": 0}, ValueError, "width must be in"),
    ({"height": 1.5}, TypeError, "height must be an int; got float"),
    ({"timeout": -1}, ValueError, "timeout must be a finite number"),
    ({"full_page": "no"}, TypeError, "full_page must be a bool"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        open_in_browser(_page(tmp_path, ""), **kwargs)


def test_missing_file_is_named(tmp_path):
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    with pytest.raises(FileNotFoundError, match="html_path: expected an HTML file"):
        open_in_browser(tmp_path / "nope.html")
