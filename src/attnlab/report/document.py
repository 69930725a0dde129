"""The report document: one self-contained HTML file and a Markdown twin.

A :class:`Report` is a flat list of blocks (sections, paragraphs, tables, figures, code)
rendered two ways:

* :meth:`Report.to_html` -- one file with inline CSS, a table of contents built from the
  sections, and every figure's ``<svg>`` inlined, so it opens with no network access;
* :meth:`Report.to_markdown` -- the same content, tables as pipe tables and figures as links
  to their PNG files.

Safety rules (text comes from datasets: tokens, reviews):

* every text (paragraphs, headings, table cells, captions, code) goes through
  :func:`html.escape`, so ``<script>alert(1)</script>`` shows as text;
* an inlined SVG loses its XML prologue and DOCTYPE, every ``<script>``, ``<foreignObject>``
  and ``<metadata>`` element, every ``on*`` attribute, and every attribute or ``<style>``
  that refers outside the file (``href`` not starting with ``#`` or ``data:``, any value
  containing ``://``);
* the HTML holds no ``http://`` or ``https://`` substring except in ``xmlns`` attributes of
  inlined SVGs. A namespace name is an identifier, never fetched by a browser, and the HTML
  parser ignores it anyway (inline ``<svg>`` gets the SVG namespace from its tag name); it is
  kept so that the ``<svg>`` element stays valid XML when copied out. A ``://`` left in
  *text* (a URL in a review, an axis label) is written ``&#58;//``: the reader sees the same
  characters, and the absence of links is a plain substring check.
"""

from __future__ import annotations

import html
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from attnlab.files import write_text_atomic

_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"
# Serialise SVG elements without ``ns0:`` prefixes: an HTML parser does not resolve
# namespace prefixes, so ``<ns0:svg>`` would not render.
ET.register_namespace("", _SVG_NS)
ET.register_namespace("xlink", _XLINK_NS)

_ANCHOR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_DROPPED_TAGS = {"script", "foreignObject", "metadata"}
# ``url(#id)`` and ``href="#id"`` references inside one SVG, rewritten with the id prefix.
_URL_REF_RE = re.compile(r"url\(\s*#([^)\s]+)\s*\)")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1f2328; background: #ffffff; line-height: 1.55;
       max-width: 72rem; margin: 2rem auto; padding: 0 1.25rem; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2.2rem; }
nav.toc { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px;
          padding: .6rem 1.2rem; }
nav.toc ol { margin: .3rem 0; }
a { color: #0969da; }
div.table { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: .85rem; }
caption { caption-side: bottom; color: #57606a; font-size: .9rem; padding-top: .3rem;
          text-align: left; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; text-align: left;
         white-space: nowrap; }
td:last-child { white-space: normal; min-width: 12rem; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1.5rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: .9rem; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px;
      padding: .7rem 1rem; overflow-x: auto; font-size: .88rem; }
"""


def _esc(text: object) -> str:
    """HTML-escape ``text``; ``://`` becomes ``&#58;//`` (same characters on screen)."""
    return html.escape(str(text)).replace("://", "&#58;//")


def _slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return "s-" + slug if not slug or not slug[0].isalpha() else slug


def _local(tag: str) -> str:
    """Tag or attribute name without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def _sanitize_svg(text: str, prefix: str, where: Path) -> str:
    """The ``<svg>`` element of ``text``, safe to inline (see the module docstring).

    ``id``s get ``prefix`` (and so do ``#id`` / ``url(#id)`` references): two matplotlib
    figures reuse ids such as ``patch_1`` and clip-path names, and in one HTML document
    the second figure would otherwise draw with the first one's definitions.
    """
    try:
        # ElementTree drops the XML declaration and DOCTYPE; expat never fetches the DTD.
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"svg_path: expected an SVG file, {where} is not XML ({err})") from None
    if _local(root.tag) != "svg":
        raise ValueError(f"svg_path: expected an <svg> root element, {where} has <{root.tag}>")

    def fix_ref(value: str) -> str:
        value = _URL_REF_RE.sub(lambda m: f"url(#{prefix}{m.group(1)})", value)
        return "#" + prefix + value[1:] if value.startswith("#") else value

    def clean(elem: ET.Element) -> None:
        for child in list(elem):
            name = _local(child.tag) if isinstance(child.tag, str) else ""
            style = (child.text or "") if name == "style" else ""
            if name in _DROPPED_TAGS or not isinstance(child.tag, str):
                elem.remove(child)  # also drops comments and processing instructions
            elif "://" in style or "@import" in style:  # CSS that could load a resource
                elem.remove(child)
            else:
                clean(child)
        for attr, value in list(elem.attrib.items()):
            name = _local(attr)
            external = name == "href" and not value.startswith(("#", "data:"))
            if name.lower().startswith("on") or external or "://" in value:
                del elem.attrib[attr]
            elif name == "id":
                elem.attrib[attr] = prefix + value
            else:
                elem.attrib[attr] = fix_ref(value)

    clean(root)
    out = ET.tostring(root, encoding="unicode")
    # Text nodes may still say "://" (labels); namespace declarations are left alone.
    parts = re.split(r'(\sxmlns(?::\w+)?="[^"]*")', out)
    return "".join(p if i % 2 else p.replace("://", "&#58;//") for i, p in enumerate(parts))


def _md_text(text: object) -> str:
    """Markdown-safe inline text: HTML special characters escaped, one line."""
    return " ".join(html.escape(str(text), quote=False).split())


def _md_cell(text: object) -> str:
    return _md_text(text).replace("|", "\\|")


class Report:
    """A report document; see the module docstring for the rendering and safety rules."""

    def __init__(self, title: str):
        self.title = title
        self._blocks: list[tuple] = []
        self._anchors: set[str] = set()

    # -- building ---------------------------------------------------------------------------
    def section(self, title: str, anchor: str | None = None) -> None:
        """Start a section; ``anchor`` (default: a slug of ``title``) is its HTML id."""
        if anchor is None:
            base, anchor, n = _slug(title), _slug(title), 2
            while anchor in self._anchors:  # repeated titles get -2, -3, ...
                anchor, n = f"{base}-{n}", n + 1
        elif not _ANCHOR_RE.match(anchor):
            raise ValueError(
                f"anchor: expected a letter then letters, digits, '-' or '_', got {anchor!r}"
            )
        elif anchor in self._anchors:
            raise ValueError(f"anchor: expected a new anchor, {anchor!r} is already used")
        self._anchors.add(anchor)
        self._blocks.append(("section", title, anchor))

    def paragraph(self, text: str) -> None:
        self._blocks.append(("paragraph", text))

    def table(self, columns: list[str], rows: list[list], *, caption: str = "") -> None:
        """A table; cells are shown with ``str()`` (numbers are formatted by the caller)."""
        for i, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"rows: expected {len(columns)} cells per row (one per column), "
                    f"row {i} has {len(row)}"
                )
        self._blocks.append(("table", list(columns), [list(r) for r in rows], caption))

    def figure(self, svg_path: Path, png_path: Path | None = None, *, caption: str) -> None:
        """Inline the SVG at ``svg_path`` (sanitised now); Markdown links ``png_path``."""
        svg_path = Path(svg_path)
        prefix = f"fig{sum(b[0] == 'figure' for b in self._blocks) + 1}-"
        svg = _sanitize_svg(svg_path.read_text(encoding="utf-8"), prefix, svg_path)
        link = Path(png_path) if png_path is not None else svg_path
        self._blocks.append(("figure", svg, link, caption))

    def code(self, text: str) -> None:
        self._blocks.append(("code", text))

    # -- rendering --------------------------------------------------------------------------
    def to_html(self) -> str:
        sections = [b for b in self._blocks if b[0] == "section"]
        out = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(self.title)}</h1>",
        ]
        if sections:
            out.append('<nav class="toc"><strong>Contents</strong><ol>')
            out += [f'<li><a href="#{a}">{_esc(t)}</a></li>' for _, t, a in sections]
            out.append("</ol></nav>")
        for block in self._blocks:
            kind = block[0]
            if kind == "section":
                out.append(f'<h2 id="{block[2]}">{_esc(block[1])}</h2>')
            elif kind == "paragraph":
                out.append(f"<p>{_esc(block[1])}</p>")
            elif kind == "table":
                _, columns, rows, caption = block
                out.append('<div class="table"><table>')
                if caption:
                    out.append(f"<caption>{_esc(caption)}</caption>")
                out.append("<thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns))
                out.append("</tr></thead><tbody>")
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>")
                out.append("</tbody></table></div>")
            elif kind == "figure":
                out.append(f"<figure>{block[1]}<figcaption>{_esc(block[3])}</figcaption></figure>")
            elif kind == "code":
                out.append(f"<pre><code>{_esc(block[1])}</code></pre>")
        out += ["</body>", "</html>", ""]
        return "\n".join(out)

    def to_markdown(self, figures_relative_to: Path) -> str:
        """Markdown; figure links are relative to ``figures_relative_to`` (the .md folder)."""
        base = Path(figures_relative_to)
        out = [f"# {_md_text(self.title)}", ""]
        for block in self._blocks:
            kind = block[0]
            if kind == "section":
                out += [f"## {_md_text(block[1])}", ""]
            elif kind == "paragraph":
                out += [_md_text(block[1]), ""]
            elif kind == "table":
                _, columns, rows, caption = block
                out.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
                out.append("|" + "---|" * len(columns))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out += ["", f"*{_md_text(caption)}*", ""] if caption else [""]
            elif kind == "figure":
                _, _, link, caption = block
                rel = Path(os.path.relpath(link.resolve(), base.resolve())).as_posix()
                alt = _md_text(caption).replace("[", "\\[").replace("]", "\\]")
                out += [f"![{alt}](<{rel}>)", "", f"*{_md_text(caption)}*", ""]
            elif kind == "code":
                text = block[1]
                # A fence longer than any backtick run inside, so the code cannot close it.
                runs = [len(r) for r in re.findall(r"`+", text)]
                fence = "`" * max(3, max(runs, default=0) + 1)
                out += [fence, text.rstrip("\n"), fence, ""]
        return "\n".join(out)

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write ``report.html`` and ``report.md`` into ``out_dir`` (created if missing)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"html": out_dir / "report.html", "markdown": out_dir / "report.md"}
        write_text_atomic(paths["html"], self.to_html())  # a kill never leaves half a page
        write_text_atomic(paths["markdown"], self.to_markdown(out_dir))
        return paths
