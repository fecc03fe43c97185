"""Self-contained HTML reports: one file, figures embedded as base64 PNG, no external assets.

A report is a list of blocks (headings, paragraphs, tables, figures) rendered in order. All text
is escaped with :func:`html.escape`; only a :class:`RawHTML` string is inserted as it is, so a
loss curve labelled ``<script>`` is shown, never run.

Example:
    >>> report = HTMLReport("Scaling")
    >>> anchor = report.add_section("Fit", "Loss follows L(N, D) = E + A/N^a + B/D^b.")
    >>> report.add_table([{"n_params": 70e9, "n_tokens": 1.4e12, "loss": 1.93667}], caption="Chinchilla")
    >>> "<td class=\\"num\\">7e10</td>" in report.render()
    True
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_write_text
from leanscale.report.table import format_number, is_numeric, table_columns

__all__ = ["HTMLReport", "RawHTML"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 980px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2em; border-bottom: 1px solid #eaeef2; padding-bottom: .2em; }
h3 { font-size: 1.1em; margin-top: 1.5em; }
p.subtitle { color: #59636e; margin-top: -.6em; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #59636e; font-size: 13px; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12.5px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.note { border-left: 4px solid #d0d7de; padding: .2em .8em; color: #59636e; }
.note.failed { border-color: #cf222e; color: #82071e; }
.note.planned { border-color: #bf8700; }
.note.ok { border-color: #1a7f37; }
""".strip()


class RawHTML(str):
    """A string of trusted HTML that :class:`HTMLReport` inserts without escaping."""

    __slots__ = ()


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _text_to_html(content: str) -> str:
    """Escaped paragraphs; a blank line separates paragraphs, raw HTML passes through."""
    if isinstance(content, RawHTML):
        return str(content)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(content)) if p.strip()]
    return "\n".join(f"<p>{_esc(p)}</p>" for p in paragraphs)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


class HTMLReport:
    """A single-file HTML report.

    Args:
        title: the page title and top heading.
        subtitle: an optional line under the title (what was run, when, on what).

    The ``add_*`` methods append blocks in order; :meth:`render` returns the page and
    :meth:`write` saves it atomically. Sections at level 2 appear in a table of contents when
    there are at least two.
    """

    def __init__(self, title: str, subtitle: str | None = None):
        self.title = str(title)
        self.subtitle = subtitle
        # (kind, payload): kind is "section" (level, title, anchor) or "html" (rendered block).
        self._blocks: list[tuple[str, Any]] = []
        self._anchors: set[str] = set()

    # ------------------------------------------------------------------ blocks
    def add_section(self, title: str, content: str | None = None, *, level: int = 2) -> str:
        """A heading, optionally followed by text (escaped) or :class:`RawHTML`.

        Args:
            title: heading text.
            content: text (paragraphs separated by blank lines) or :class:`RawHTML`.
            level: 2 for a top-level section (listed in the contents), 3 or 4 for a subsection.

        Returns:
            The anchor id of the heading (``index.html#<id>`` links to it).
        """
        if level not in (2, 3, 4):
            raise InvalidParameterError(
                f"The 'level' parameter of HTMLReport.add_section must be 2, 3 or 4. Got {level!r} instead."
            )
        anchor = _slug(str(title), self._anchors)
        self._blocks.append(("section", (level, str(title), anchor)))
        if content is not None:
            self._blocks.append(("html", _text_to_html(content)))
        return anchor

    def add_paragraph(self, text: str, *, css_class: str | None = None) -> None:
        """One paragraph of escaped text (or :class:`RawHTML`), optionally with a CSS class."""
        inner = str(text) if isinstance(text, RawHTML) else _esc(text)
        cls = f' class="{_esc(css_class)}"' if css_class else ""
        self._blocks.append(("html", f"<p{cls}>{inner}</p>"))

    def add_note(self, text: str, *, kind: str = "info") -> None:
        """A highlighted note; ``kind`` is ``info``, ``ok``, ``planned`` or ``failed``."""
        self.add_paragraph(text, css_class=f"note {kind}")

    def add_preformatted(self, text: str) -> None:
        """Monospace text as it is (a command line, a terminal table, a traceback), escaped."""
        self._blocks.append(("html", f"<pre><code>{_esc(text)}</code></pre>"))

    def add_details(self, summary: str, text: str) -> None:
        """Collapsed monospace text (a traceback, a long log) under a one-line summary."""
        self._blocks.append(
            ("html", f"<details><summary>{_esc(summary)}</summary><pre><code>{_esc(text)}</code></pre></details>")
        )

    def add_html(self, raw: str) -> None:
        """Trusted HTML, inserted without escaping. Never pass user or data text here."""
        self._blocks.append(("html", str(raw)))

    def add_table(
        self,
        rows: Iterable[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        caption: str | None = None,
    ) -> None:
        """A table of dict rows; numbers go through :func:`~leanscale.report.table.format_number`.

        Args:
            rows: one mapping per row.
            columns: keys to show, in order (default: all keys in order of first appearance).
            caption: an optional caption above the table.
        """
        rows = list(rows)
        cols = table_columns(rows, columns)
        parts = ["<table>"]
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr></thead>")
        parts.append("<tbody>")
        for row in rows:
            cells = []
            for c in cols:
                value = row.get(c)
                cls = ' class="num"' if is_numeric(value) else ""
                cells.append(f"<td{cls}>{_esc(format_number(value))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._blocks.append(("html", "\n".join(parts)))

    def add_figure(self, fig_or_png: Any, caption: str | None = None, *, alt: str | None = None,
                   dpi: int = 110) -> None:
        """A figure embedded as a base64 PNG ``data:`` URI.

        Args:
            fig_or_png: a matplotlib figure (rendered with
                :func:`~leanscale.report.figures.figure_to_png_bytes`) or PNG bytes.
            caption: shown under the figure (and used as alt text unless ``alt`` is given).
            alt: alternative text for the image.
            dpi: resolution when a figure is rendered.

        Raises:
            InvalidParameterError: ``fig_or_png`` is bytes that are not a PNG file.
            MissingDependencyError: a figure is passed and matplotlib is missing.
        """
        if isinstance(fig_or_png, (bytes, bytearray, memoryview)):
            png = bytes(fig_or_png)
            if not png.startswith(_PNG_MAGIC):
                raise InvalidParameterError(
                    "The 'fig_or_png' parameter of HTMLReport.add_figure must be a matplotlib figure "
                    f"or PNG bytes. Got {len(png)} bytes that do not start with the PNG signature."
                )
        elif hasattr(fig_or_png, "savefig"):
            from leanscale.report.figures import figure_to_png_bytes

            png = figure_to_png_bytes(fig_or_png, dpi=dpi)
        else:
            raise InvalidParameterError(
                "The 'fig_or_png' parameter of HTMLReport.add_figure must be a matplotlib figure or "
                f"PNG bytes. Got {type(fig_or_png).__name__} instead."
            )
        data = base64.b64encode(png).decode("ascii")
        alt_text = alt if alt is not None else (caption or "figure")
        block = f'<figure><img alt="{_esc(alt_text)}" src="data:image/png;base64,{data}">'
        if caption:
            block += f"<figcaption>{_esc(caption)}</figcaption>"
        block += "</figure>"
        self._blocks.append(("html", block))

    def extend(self, other: HTMLReport) -> None:
        """Append every block of ``other`` (its title is dropped; anchors are kept unique)."""
        for kind, payload in other._blocks:
            if kind == "section":
                level, title, anchor = payload
                if anchor in self._anchors:
                    anchor = _slug(title, self._anchors)
                else:
                    self._anchors.add(anchor)
                payload = (level, title, anchor)
            self._blocks.append((kind, payload))

    # ------------------------------------------------------------------ output
    def render(self) -> str:
        """The whole page as one HTML string."""
        sections = [(title, anchor) for kind, payload in self._blocks if kind == "section"
                    for level, title, anchor in [payload] if level == 2]
        out = [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(self.title)}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(self.title)}</h1>",
        ]
        if self.subtitle:
            out.append(f'<p class="subtitle">{_esc(self.subtitle)}</p>')
        if len(sections) >= 2:
            items = "".join(f'<li><a href="#{_esc(a)}">{_esc(t)}</a></li>' for t, a in sections)
            out.append(f"<nav><ol>{items}</ol></nav>")
        for kind, payload in self._blocks:
            if kind == "section":
                level, title, anchor = payload
                out.append(f'<h{level} id="{_esc(anchor)}">{_esc(title)}</h{level}>')
            else:
                out.append(payload)
        out += ["</body>", "</html>", ""]
        return "\n".join(out)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page atomically (temp file + rename) and return its path."""
        return atomic_write_text(path, self.render())

    def __len__(self) -> int:
        return len(self._blocks)
