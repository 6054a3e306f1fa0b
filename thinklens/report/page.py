"""The report page: sections of text, figures and number tables, one self-contained HTML file.

1. A :class:`Report` holds :class:`Section` s; each has a title, a few sentences of
   explanation, figures (plotly), an optional :class:`Table` and an optional note (why a
   part was skipped or failed).
2. :meth:`Report.to_html` renders one page: plotly.js inlined once in ``<head>``, each
   figure as ``fig.to_html(full_html=False, include_plotlyjs=False)`` (a ``<div>`` and the
   script that draws it). No file or network is referenced, so the page works offline
   when opened from disk. Every piece of text that is not ours (prompts, thinking,
   answers, model names) is escaped with :func:`html.escape`; plotly escapes ``<`` and
   ``>`` inside its JSON, and the plot functions escape model text in labels.
3. :meth:`Report.write` exports every figure as PDF and SVG into ``figures/`` (one
   browser for all, :func:`thinklens.figures.export_session`), then writes the page.
   Every file is written to a temporary name and renamed, so a reader never sees a torn
   file; the page is written last, then figure files of an earlier report in the same
   folder that this one does not have are removed.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from thinklens.errors import ConfigError
from thinklens.figures import export, export_session
from thinklens.hooks._fileio import atomic_write_text

FORMATS = ("pdf", "svg")
PAGE = "report.html"
FIGURES = "figures"
_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}

_CSS = """
body { font-family: Helvetica, Arial, 'DejaVu Sans', sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
                                  margin-top: 2em; }
.meta { color: #555; } .note { background: #fff6e0; border-left: 4px solid #e0a800;
                                padding: 0.5em 0.8em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f6f8; } code, .mono { font-family: 'DejaVu Sans Mono', monospace; }
nav ol { columns: 2; }
"""


@dataclass
class Table:
    """A small table of numbers or text; every cell is escaped when rendered.

    Example::

        Table(["layer", "accuracy"], [["blocks.0", 0.06], ["blocks.1", 1.0]])
    """

    columns: list[str]
    rows: list[list[Any]]
    mono: Sequence[int] = ()   # column indices shown in a monospace font (model text)

    def __post_init__(self) -> None:
        bad = [k for k, r in enumerate(self.rows) if len(r) != len(self.columns)]
        if bad:
            raise ConfigError(f"table rows {bad} do not have {len(self.columns)} cells "
                              f"(columns {self.columns})")


@dataclass
class Figure:
    """A plotly figure with the file name it is exported under and a caption."""

    name: str
    fig: Any
    caption: str = ""


@dataclass
class Section:
    """One part of the report: title, explanation, figures, a table, a note."""

    title: str
    text: str
    figures: list[Figure] = field(default_factory=list)
    table: Table | None = None
    note: str | None = None

    def figure(self, name: str, fig: Any, caption: str = "") -> Section:
        self.figures.append(Figure(name, fig, caption))
        return self


class Report:
    """An ordered list of sections rendered to one HTML page.

    Example::

        rep = Report("thinklens report", meta={"model": "organism"})
        rep.add(Section("Traces", "What the model wrote.")).figure("trace-0", fig)
        rep.write("out/")          # out/report.html, out/figures/01-trace-0.{pdf,svg}
    """

    def __init__(self, title: str, *, meta: dict[str, Any] | None = None):
        self.title = title
        self.meta = dict(meta or {})
        self.sections: list[Section] = []
        self.traces: list[Any] = []   # the traces a study ran on (kept for inspection, not drawn)

    def add(self, section: Section) -> Section:
        self.sections.append(section)
        return section

    def figures(self) -> list[tuple[str, Figure]]:
        """``(file stem, figure)`` for every figure, numbered in page order."""
        out, seen = [], set()
        for fig in (f for s in self.sections for f in s.figures):
            stem = f"{len(out) + 1:02d}-{_slug(fig.name)}"
            if stem in seen:
                raise ConfigError(f"two figures named {fig.name!r}")
            seen.add(stem)
            out.append((stem, fig))
        return out

    def to_html(self, formats: Sequence[str] = FORMATS) -> str:
        """The whole page as a string (see the module docstring)."""
        from plotly.offline import get_plotlyjs

        stems = {id(f): stem for stem, f in self.figures()}
        esc = html.escape
        meta = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>"
                       for k, v in self.meta.items())
        toc = "".join(f'<li><a href="#s{k}">{esc(s.title)}</a></li>'
                      for k, s in enumerate(self.sections, 1))
        body = [_section(k, s, stems, formats) for k, s in enumerate(self.sections, 1)]
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{esc(self.title)}</title>\n<style>{_CSS}</style>\n"
                f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n"
                f"<body>\n<h1>{esc(self.title)}</h1>\n<ul class=\"meta\">{meta}</ul>\n"
                f"<nav><ol>{toc}</ol></nav>\n" + "\n".join(body) + "\n</body>\n</html>\n")

    def write(self, out: str | os.PathLike[str], *, formats: Sequence[str] = FORMATS,
              progress: bool = True) -> Path:
        """Export the figures into ``out/figures/`` and write ``out/report.html``; its path."""
        bad = [f for f in formats if f not in ("pdf", "svg", "png")]
        if bad:
            raise ConfigError(f"formats {bad}; valid: 'pdf', 'svg', 'png'")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        figs = self.figures()
        if formats and figs:
            (out / FIGURES).mkdir(exist_ok=True)
            with export_session():
                for stem, f in tqdm(figs, desc="export figures", unit="fig",
                                    disable=not progress):
                    for fmt in formats:
                        export(f.fig, out / FIGURES / f"{stem}.{fmt}")
        page = out / PAGE
        atomic_write_text(page, self.to_html(formats))
        keep = {f"{stem}.{fmt}" for stem, _ in figs for fmt in formats}
        for old in (out / FIGURES).glob("[0-9][0-9]-*.*") if (out / FIGURES).is_dir() else ():
            if old.name not in keep and old.suffix in (".pdf", ".svg", ".png"):
                old.unlink()  # a figure of an earlier report in this folder
        return page


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "figure"


def _section(k: int, s: Section, stems: dict[int, str], formats: Sequence[str]) -> str:
    esc = html.escape
    parts = [f'<section id="s{k}">', f"<h2>{k}. {esc(s.title)}</h2>",
             *(f"<p>{esc(p)}</p>" for p in s.text.split("\n\n") if p.strip())]
    if s.note:
        parts.append(f'<p class="note">{esc(s.note)}</p>')
    if s.table is not None:
        parts.append(_table(s.table))
    for f in s.figures:
        stem = stems[id(f)]
        div = f.fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{stem}",
                            config=_PLOTLY_CONFIG)
        links = " · ".join(f'<a href="{FIGURES}/{stem}.{fmt}">{fmt.upper()}</a>'
                           for fmt in formats)
        caption = esc(f.caption) + (f" ({links})" if links else "")
        parts.append(f"<figure>{div}<figcaption>{caption}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


def _cell(v: Any) -> tuple[str, bool]:
    if isinstance(v, float):
        return ("nan" if v != v else f"{v:.3f}"), True
    return html.escape(str(v)), isinstance(v, int) and not isinstance(v, bool)


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    rows = []
    for r in t.rows:
        cells = []
        for j, v in enumerate(r):
            text, num = _cell(v)
            cls = "num" if num else "mono" if j in t.mono else ""
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


__all__ = ["Table", "Figure", "Section", "Report", "FORMATS"]
