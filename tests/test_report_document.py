"""Tests of attnlab.report.document: escaping, SVG inlining, no external URLs, TOC, Markdown."""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.report.document import Report

XSS = "<script>alert(1)</script>"

SVG = """<?xml version="1.0" encoding="utf-8" standalone="no"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN"
  "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     width="40" height="20" onload="alert(2)">
 <metadata><dc:title xmlns:dc="http://purl.org/dc/elements/1.1/">Made with https://matplotlib.org/</dc:title></metadata>
 <script type="text/javascript">alert(3)</script>
 <defs><clipPath id="clip1"><rect width="10" height="10"/></clipPath>
   <path id="glyph" d="M0 0 L5 5"/></defs>
 <style>@import url(https://evil.example/x.css);</style>
 <g clip-path="url(#clip1)" onclick="alert(4)" ONMOUSEOVER="alert(5)">
   <rect width="40" height="20" fill="#eeeeee"/>
   <use xlink:href="#glyph"/>
   <image href="https://evil.example/pixel.png"/>
   <text x="1" y="15">see http://example.org</text>
 </g>
</svg>
"""


class _Collect(HTMLParser):
    """Ids, in-page link targets and tag names of an HTML document."""

    def __init__(self):
        super().__init__()
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            if name in ("href", "xlink:href"):
                self.hrefs.append(value)


def _parse(doc: str) -> _Collect:
    p = _Collect()
    p.feed(doc)
    p.close()
    return p


def _urls_outside_xmlns(doc: str) -> list[str]:
    without_ns = re.sub(r'\sxmlns(?::\w+)?="[^"]*"', "", doc)
    return re.findall(r"https?://\S*", without_ns)


@pytest.fixture
def svg_file(tmp_path) -> Path:
    path = tmp_path / "figs" / "heat.svg"
    path.parent.mkdir()
    path.write_text(SVG, encoding="utf-8")
    return path


def test_text_is_escaped_everywhere():
    r = Report(f"Title {XSS}")
    r.section(f"Section {XSS}")
    r.paragraph(f"A review: {XSS}")
    r.table(["model", XSS], [["exact", XSS], [XSS, "0.91"]], caption=f"cap {XSS}")
    r.code(f"print('{XSS}')")
    doc = r.to_html()
    assert "<script" not in doc.lower()
    # Title (2), section heading + its TOC entry (2), paragraph, header, 2 cells, caption, code.
    assert doc.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 10
    assert "script" not in _parse(doc).tags


def test_figure_caption_is_escaped(svg_file):
    r = Report("r")
    r.figure(svg_file, caption=XSS)
    doc = r.to_html()
    assert "<script" not in doc.lower()
    assert "<figcaption>&lt;script&gt;alert(1)&lt;/script&gt;</figcaption>" in doc


def test_svg_inlining_strips_prologue_scripts_handlers_and_external_refs(svg_file):
    r = Report("r")
    r.figure(svg_file, caption="heat map")
    doc = r.to_html()
    start, end = doc.index("<svg"), doc.index("</svg>") + len("</svg>")
    svg = doc[start:end]
    assert "<?xml" not in doc and "<!DOCTYPE svg" not in doc
    assert "alert" not in doc  # script body, onload, onclick, ONMOUSEOVER
    assert re.search(r"\son\w+=", svg, flags=re.I) is None
    assert "metadata" not in svg and "@import" not in svg and "evil.example" not in svg
    # The drawing itself survives, ids renamed consistently, and it is still well-formed XML.
    root = ET.fromstring(svg)
    ids = {e.get("id") for e in root.iter() if e.get("id")}
    assert ids == {"fig1-clip1", "fig1-glyph"}
    assert 'clip-path="url(#fig1-clip1)"' in svg
    assert 'xlink:href="#fig1-glyph"' in svg
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')  # no ns0: prefixes
    # Label text is kept, with "://" written as a character reference: same text on screen.
    text = next(e for e in root.iter() if e.tag.endswith("text"))
    assert text.text == "see http://example.org"


def test_two_figures_get_distinct_ids(svg_file):
    r = Report("r")
    r.figure(svg_file, caption="a")
    r.figure(svg_file, caption="b")
    ids = _parse(r.to_html()).ids
    assert len(ids) == len(set(ids)) and "fig2-clip1" in ids


def test_no_external_urls_except_svg_namespaces(svg_file):
    r = Report("Report")
    r.section("Links")
    r.paragraph("a review citing https://example.com/review and http://x.y")
    r.table(["url"], [["https://example.com"]], caption="see http://a.b")
    r.code("curl https://example.com")
    r.figure(svg_file, caption="https://caption.example")
    doc = r.to_html()
    assert _urls_outside_xmlns(doc) == []
    # Where the substring does occur, it is only the namespace names, never fetched.
    assert set(re.findall(r"https?://[^\"\s<]*", doc)) == {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    assert all(h.startswith("#") for h in _parse(doc).hrefs)
    assert "https&#58;//example.com/review" in doc  # the text is still there


def test_bad_svg_is_refused(tmp_path):
    bad = tmp_path / "x.svg"
    bad.write_text("<html><body/></html>")
    with pytest.raises(ValueError, match="svg_path"):
        Report("r").figure(bad, caption="c")
    bad.write_text("not xml")
    with pytest.raises(ValueError, match="svg_path"):
        Report("r").figure(bad, caption="c")


def test_toc_lists_every_section_with_working_anchors():
    r = Report("r")
    titles = ["Results", "Results", "Speed & memory", "2 Appendix", "Why <b>?"]
    for t in titles:
        r.section(t)
    r.section("Custom", anchor="my-anchor")
    doc = r.to_html()
    parsed = _parse(doc)
    toc = re.search(r'<nav class="toc">(.*?)</nav>', doc, flags=re.S).group(1)
    links = re.findall(r'<a href="#([^"]+)">(.*?)</a>', toc)
    assert [text for _, text in links] == [
        "Results", "Results", "Speed &amp; memory", "2 Appendix", "Why &lt;b&gt;?", "Custom"
    ]
    targets = [a for a, _ in links]
    assert len(set(targets)) == len(targets) and set(targets) <= set(parsed.ids)
    assert "my-anchor" in targets
    assert all(re.match(r"^[A-Za-z][\w-]*$", a) for a in targets)


def test_anchor_and_table_errors():
    r = Report("r")
    r.section("A", anchor="a")
    with pytest.raises(ValueError, match="anchor.*already used"):
        r.section("B", anchor="a")
    with pytest.raises(ValueError, match="anchor"):
        r.section("C", anchor='x" onclick="y')
    with pytest.raises(ValueError, match="rows: expected 2 cells.*row 1 has 1"):
        r.table(["a", "b"], [[1, 2], [3]])


def _pipe_cells(line: str) -> list[str]:
    """Split a pipe-table row on unescaped pipes (what a Markdown renderer does)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_tables_and_figures(svg_file, tmp_path):
    png = svg_file.with_suffix(".png")
    r = Report("Comparison")
    r.section("Results")
    r.paragraph(f"Review: {XSS}")
    r.table(["mechanism", "a|b"], [["exact", "x | y"], ["line\nbreak", "0.90"]], caption="cap")
    r.figure(svg_file, png, caption="heat [map]")
    r.figure(svg_file, caption="svg only")
    r.code("```\nnested fence\n```")
    out_dir = tmp_path / "report"
    md = r.to_markdown(out_dir)
    lines = md.splitlines()
    i = lines.index("| mechanism | a\\|b |")
    assert lines[i + 1] == "|---|---|"
    assert _pipe_cells(lines[i + 2]) == ["exact", "x \\| y"]
    assert _pipe_cells(lines[i + 3]) == ["line break", "0.90"]
    assert "![heat \\[map\\]](<../figs/heat.png>)" in md
    assert "(<../figs/heat.svg>)" in md  # without a PNG the SVG is linked
    assert "<script" not in md and "&lt;script&gt;" in md
    assert "````\n```\nnested fence\n```\n````" in md
    assert md.startswith("# Comparison\n") and "## Results" in md


def test_write_creates_both_files(svg_file, tmp_path):
    r = Report("r")
    r.section("S")
    r.figure(svg_file, svg_file.with_suffix(".png"), caption="c")
    paths = r.write(tmp_path / "out" / "nested")
    assert paths["html"].read_text(encoding="utf-8") == r.to_html()
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md == r.to_markdown(tmp_path / "out" / "nested")
    assert "(<../../figs/heat.png>)" in md


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_round_trips_as_text(text):
    """Whatever the dataset text, the HTML shows it verbatim and adds no tag."""
    r = Report("r")
    r.paragraph(text)
    doc = r.to_html()
    body = re.search(r"<p>(.*?)</p>", doc, flags=re.S).group(1)
    assert "<" not in body and ">" not in body
    assert html.unescape(body) == text


def test_matplotlib_svg_is_inlined_without_urls(tmp_path):
    """A real figure: matplotlib writes a DOCTYPE, metadata with URLs and shared ids."""
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    fig.add_subplot().plot([0, 1], [1, 0], label="https://token")
    fig.axes[0].set_title("<b>tok</b>")
    path = tmp_path / "m.svg"
    fig.savefig(path, format="svg")
    r = Report("r")
    r.figure(path, caption="m")
    r.figure(path, caption="m again")
    doc = r.to_html()
    assert _urls_outside_xmlns(doc) == [] and "<b>tok" not in doc
    ids = _parse(doc).ids
    assert len(ids) == len(set(ids))
