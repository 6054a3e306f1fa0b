"""Paper files from plotly figures: PDF, SVG or PNG, byte-identical from run to run.

1. The format comes from the path's suffix: ``.pdf``, ``.svg`` or ``.png``.
2. A headless Chromium renders the figure through kaleido (v1). The browser is, in this
   order: ``browser=``, ``$BROWSER_PATH``, Debian's ``/usr/bin/chromium``, ``chromium`` or
   ``google-chrome`` on ``PATH``, a copy kaleido downloaded before. Nothing is downloaded;
   with no browser, :func:`export` says how to install one. MathJax (fetched from a CDN
   by default) is off, so export works offline.
3. What differs between two renders of one figure is normalised:

   - PDF: Chromium stamps ``/CreationDate`` and ``/ModDate``. Both are rewritten in place
     to ``$SOURCE_DATE_EPOCH`` (the reproducible-builds convention), else 1970-01-01,
     keeping their length so the cross-reference table's byte offsets stay valid.
   - SVG: plotly.js names clip paths and gradients after a random 6-character plot id.
     It becomes a hash of the file itself: stable, and still distinct between figures
     inlined in one page. Traces without a ``uid`` get ``t0``, ``t1``, … for the same reason.
   - PNG: nothing varies.
4. The file is written atomically (a temporary file in the same folder, then renamed).

Each export starts a browser (seconds); ``with export_session(): ...`` keeps one open
for many figures.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from thinklens.errors import ConfigError, ThinklensError
from thinklens.hooks._fileio import atomic_write_bytes

FORMATS = ("pdf", "svg", "png")
DEBIAN_CHROMIUM = "/usr/bin/chromium"
_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_INSTALL = ("install Chromium: `apt-get install -y chromium` (Debian/Ubuntu; `bash .ci/browser` "
            "does it in this repo), or point $BROWSER_PATH at a Chrome/Chromium executable")
_session_depth = 0


def export(fig: Any, path: str | os.PathLike[str], *, width: int | None = None,
           height: int | None = None, scale: float = 1, browser: str | None = None) -> Path:
    """Write ``fig`` to ``path`` as PDF, SVG or PNG (by suffix); returns the path.

    Example::

        export(plot_trace(trace, size="one"), "fig2.pdf")     # 3.25 in wide, vector
        export(fig, "fig2.png", width=648, height=288, scale=2)  # 1296 x 576 px

    ``width``/``height`` (px, 96 per inch) default to the figure's layout size, else
    700 x 500; ``scale`` multiplies the pixels of a PNG.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"cannot export to {str(path)!r}: unknown format "
                          f"{path.suffix or '(no suffix)'!r}; valid: "
                          + ", ".join(f".{f}" for f in FORMATS))
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: no folder {str(path.parent)!r}")
    if not hasattr(fig, "to_dict"):
        raise ConfigError(f"expected a plotly figure, got {type(fig).__name__}")
    for name, v in (("width", width), ("height", height), ("scale", scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise ConfigError(f"{name}={v!r}; must be a positive number")
    layout = fig.to_dict().get("layout", {})
    opts = {"format": fmt, "scale": scale,
            "width": width or layout.get("width") or 700,
            "height": height or layout.get("height") or 500}
    data = _render(_stable_uids(fig), opts, browser)
    data = {"pdf": _normalise_pdf, "svg": _normalise_svg}.get(fmt, bytes)(data)
    atomic_write_bytes(path, data)
    return path


@contextmanager
def export_session(browser: str | None = None) -> Iterator[None]:
    """Keep one headless browser open for the exports inside the ``with`` block.

    Example::

        with export_session():
            for name, fig in figures.items():
                export(fig, f"paper/{name}.pdf")
    """
    global _session_depth
    kaleido = _kaleido()
    path = find_browser(browser)
    if _session_depth == 0:
        kaleido.start_sync_server(path=path, mathjax=False, silence_warnings=True)
    _session_depth += 1
    try:
        yield
    finally:
        _session_depth -= 1
        if _session_depth == 0:
            kaleido.stop_sync_server(silence_warnings=True)


def find_browser(browser: str | None = None) -> str:
    """Path of the Chrome/Chromium that renders exports; see the module docstring."""
    for given, what in ((browser, "browser="), (os.environ.get("BROWSER_PATH"), "$BROWSER_PATH")):
        if given:
            if not (Path(given).is_file() and os.access(given, os.X_OK)):
                raise ThinklensError(f"no browser executable at {what}{given!r}; fix the path, "
                                     f"or {_INSTALL}")
            return str(given)
    if Path(DEBIAN_CHROMIUM).is_file():
        return DEBIAN_CHROMIUM
    for name in _NAMES:
        if found := shutil.which(name):
            return found
    try:  # kaleido's own download, typical macOS/Windows paths; never downloads
        from choreographer.browsers.chromium import Chromium
        found = Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - best effort; the message below says what to do
        found = None
    if found and Path(found).is_file():
        return str(found)
    raise ThinklensError(f"no Chrome or Chromium found to render figures; {_INSTALL}")


def _kaleido() -> Any:
    try:
        import kaleido
    except ImportError as e:
        raise ThinklensError("figure export needs kaleido: pip install 'thinklens[export]' "
                             "(or pip install 'kaleido>=1')") from e
    return kaleido


def _render(fig: dict[str, Any], opts: dict[str, Any], browser: str | None) -> bytes:
    kaleido = _kaleido()
    if _session_depth:  # the session's browser renders; browser= is not consulted
        return kaleido.calc_fig_sync(fig, opts=opts)
    return kaleido.calc_fig_sync(fig, opts=opts,
                                 kopts={"path": find_browser(browser), "mathjax": False})


def _stable_uids(fig: Any) -> dict[str, Any]:
    d = fig.to_dict()
    for k, trace in enumerate(d.get("data", [])):
        trace.setdefault("uid", f"t{k}")
    return d


def _epoch_date() -> bytes:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch)).encode()


_PDF_DATE = re.compile(rb"/(CreationDate|ModDate) ?\(D:(\d{14})([^)]*)\)")


def _normalise_pdf(data: bytes) -> bytes:
    """Creation and modification dates set to the epoch, each the same number of bytes."""
    stamp = _epoch_date()

    def fix(m: re.Match[bytes]) -> bytes:
        tz = m[3]  # "+00'00'", "Z" or absent: keep its length, make it UTC
        tz = b"+00'00'" if len(tz) == 7 else b"Z" if len(tz) == 1 else tz
        return m[0][: m.start(2) - m.start(0)] + stamp + tz + b")"

    out = _PDF_DATE.sub(fix, data)
    if len(out) != len(data):  # offsets in the xref table would be wrong
        raise ThinklensError("could not normalise the PDF's dates in place")
    return out


def _normalise_svg(data: bytes) -> bytes:
    """plotly.js's random plot id replaced by a hash of the SVG with that id blanked."""
    m = re.search(rb'id="defs-([0-9a-z]+)"', data)
    if not m:
        return data
    uid = re.compile(rb"(?<=[A-Za-z\-])" + re.escape(m[1]))  # never '#ab12cd' colours
    digest = hashlib.sha256(uid.sub(b"", data)).hexdigest()[: len(m[1])].encode()
    return uid.sub(digest, data)


__all__ = ["export", "export_session", "find_browser"]
