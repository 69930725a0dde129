"""What every report figure shares: lazy matplotlib, PNG + SVG output, plain-text labels."""

from __future__ import annotations

from pathlib import Path

from attnlab.files import atomic_path
from attnlab.util.optional import matplotlib_agg

__all__ = ["mpl", "save", "plain"]


# (matplotlib, Figure, FigureCanvasAgg) for ``who``; figures never go through pyplot.
mpl = matplotlib_agg


def outputs(path, suffix: str = "") -> list[Path]:
    """``fig<suffix>.png`` and ``.svg`` from ``fig``, ``fig.png`` or ``fig.svg``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p
    stem.parent.mkdir(parents=True, exist_ok=True)
    return [stem.with_name(stem.name + suffix + ext) for ext in (".png", ".svg")]


def save(fig, path, suffix: str = "") -> list[Path]:
    outs = outputs(path, suffix)
    for out in outs:
        # "tight" grows the canvas to every artist: rotated tick labels are never clipped.
        # No date in the SVG: the same data gives the same file. Written to a temporary
        # file renamed over the figure: a kill never leaves half an image.
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=out.suffix[1:], dpi=150, bbox_inches="tight",
                        metadata={"Date": None} if out.suffix == ".svg" else None)
    return outs


def plain(text: str) -> str:
    # A token such as "$5" would otherwise start mathtext (and fail on an odd count).
    return str(text).replace("$", r"\$")
