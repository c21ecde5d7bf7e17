"""What every HTML page lsdc writes shares: escaping, a captioned figure, unique PNG file names
and matplotlib figures saved as PNG. A page and its PNGs form one folder, linked relatively, so
it opens from disk in any browser without a server."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path
from typing import Any

from lsdc.fileio import atomic_write_bytes

__all__ = ["FileNames", "esc", "figure", "pyplot", "save_figure"]


def figure(png: str, caption: str, *, css_class: str = "") -> str:
    """A `<figure>` showing `png` (a relative URL) with `caption` as alt text and caption."""
    src = html.escape(png, quote=True)
    cls = f' class="{html.escape(css_class, quote=True)}"' if css_class else ""
    return (
        f'<figure{cls}><img src="{src}" alt="{html.escape(caption, quote=True)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def esc(text: Any) -> str:
    """`text` as HTML element content."""
    return html.escape(str(text), quote=False)


class FileNames:
    """Unique, URL-safe PNG file names from free-text model and picture names."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, stem: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "figure"
        name, i = f"{base}.png", 2
        while name in self.used:
            name, i = f"{base}-{i}.png", i + 1
        self.used.add(name)
        return name


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: Path, fig) -> None:
    """Write `fig` to `path` as a 100-dpi PNG (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
