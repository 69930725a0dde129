"""A real headless Chromium opens attnlab's HTML report (issue 6).

The report must load with no console errors, no network requests and no dialogs; its
figures must render; hostile dataset strings must show as text. The last tests feed the
checker pages that break each rule, so that a checker that records nothing cannot pass.
Skipped where no Chromium is installed (CI installs Debian's ``chromium``, see .ci/run).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest

from attnlab.report.browser import BrowserNotFound, find_browser, open_in_browser

try:
    find_browser()
except BrowserNotFound as e:
    pytest.skip(f"no headless browser: {e}", allow_module_level=True)

XSS_TEXT = "<script>alert(1)</script>"
XSS_CELL = "<img src=x onerror=alert(2)>"


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


def test_report_renders_cleanly_in_a_browser(tmp_path):
    from attnlab.report.document import Report

    report = Report("Browser check")
    report.section("Data")
    report.paragraph(f"A review from the dataset: {XSS_TEXT} see https://x.example")
    report.table(["token", "count"], [[XSS_CELL, 3], ["plain", 5]], caption="tokens")
    report.figure(*_plot(tmp_path / "line", "line"), caption="a line plot")
    report.figure(*_plot(tmp_path / "heat", "heat"), caption="a heatmap")
    html = report.write(tmp_path / "out")["html"]

    # A short viewport: the screenshot must still hold the whole page.
    check = open_in_browser(html, screenshot=tmp_path / "shot.png", height=500, timeout=60)

    assert check.problems == []
    assert check.dialogs == [] and check.requests == []
    assert check.scripts == 0
    assert XSS_TEXT in check.text and XSS_CELL in check.text
    assert "https://x.example" in check.text  # written &#58;// in the HTML, same on screen
    assert [f["tag"] for f in check.figures] == ["svg", "svg"]
    for fig in check.figures:
        assert fig["width"] > 100 and fig["height"] > 50 and fig["drawn"] > 5
    data = check.screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width == 1280 and height > 900  # two figures and a table: about 1080 px
    assert len(data) > 10_000


def test_network_request_is_recorded(tmp_path):
    check = open_in_browser(_page(tmp_path, '<img src="http://example.invalid/x.png">'))
    assert check.requests == ["http://example.invalid/x.png"]
    assert any("network request" in p for p in check.problems)
    assert any("did not load" in p for p in check.problems)


def test_console_error_is_recorded(tmp_path):
    check = open_in_browser(_page(tmp_path, '<script>console.error("boom")</script>'))
    assert check.console_errors == ["console.error: boom"]
    assert check.scripts == 1


def test_dialog_is_recorded_and_dismissed(tmp_path):
    # Without dismissal the alert would block the load event and the call would time out.
    check = open_in_browser(_page(tmp_path, "<script>alert(3)</script><p>after</p>"),
                            timeout=10)
    assert check.dialogs == ["alert: 3"]
    assert "after" in check.text


def test_empty_figure_is_a_problem(tmp_path):
    check = open_in_browser(_page(tmp_path, '<figure><svg width="0" height="0"></svg></figure>'))
    assert check.figures == [{"tag": "svg", "width": 0, "height": 0, "drawn": 0,
                              "loaded": None}]
    assert any("zero size" in p for p in check.problems)
    assert any("draws nothing" in p for p in check.problems)


def test_hung_page_times_out_and_leaves_nothing_behind(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the profile goes
    with pytest.raises(TimeoutError, match="no answer to .* in time"):
        open_in_browser(_page(tmp_path, "<script>while (true) {}</script>"), timeout=3)
    assert list(scratch.iterdir()) == []


def test_missing_browser_is_named(tmp_path):
    with pytest.raises(BrowserNotFound, match="no-such-browser-attnlab"):
        open_in_browser(_page(tmp_path, ""), browser="no-such-browser-attnlab")
