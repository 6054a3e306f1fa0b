"""Open a page from disk in headless Chromium over the DevTools protocol and report problems.

Uses choreographer (installed with kaleido, which figure export needs already): it starts
Chromium with ``--remote-debugging-pipe``, so no port and no network. The checker

1. subscribes to ``Runtime.exceptionThrown`` (uncaught errors), ``Runtime.consoleAPICalled``
   (``console.error``/``console.assert``) and ``Log.entryAdded`` (failed resource loads,
   blocked requests: level ``error``), then navigates to the ``file://`` URL;
2. waits for the load event, then polls ``expression`` (a JS expression returning JSON-able
   data) until it gives the same answer twice in a row, plotly having drawn by then;
3. returns the errors and the expression's last value.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ERROR_CONSOLE = ("error", "assert")

#: Per plot div: how many drawn SVG roots (.main-svg) and shapes it holds.
PLOTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(
  d => ({id: d.id, svgs: d.querySelectorAll('svg.main-svg').length,
         shapes: d.querySelectorAll('svg.main-svg path, svg.main-svg rect, svg.main-svg image').length})))"""


@dataclass
class PageCheck:
    errors: list[str] = field(default_factory=list)
    value: Any = None


def _describe(ev: dict) -> str | None:
    method, p = ev.get("method"), ev.get("params", {})
    if method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}"
    if method == "Runtime.consoleAPICalled" and p.get("type") in ERROR_CONSOLE:
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        return f"console.{p['type']}: {args}"
    if method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        return f"log {e.get('source')}: {e.get('text')} {e.get('url', '')}".strip()
    return None


async def _check(url: str, expression: str, browser: str, timeout: float) -> PageCheck:
    import choreographer as choreo

    out = PageCheck()

    async def on_event(ev: dict) -> None:
        if (msg := _describe(ev)) is not None:
            out.errors.append(msg)

    async with choreo.Browser(path=browser, headless=True) as b:
        tab = await b.create_tab("about:blank")
        for name in ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded"):
            tab.subscribe(name, on_event)
        for cmd in ("Runtime.enable", "Log.enable", "Page.enable"):
            await tab.send_command(cmd)
        loaded = tab.subscribe_once("Page.loadEventFired")
        await tab.send_command("Page.navigate", params={"url": url})
        await asyncio.wait_for(loaded, timeout)
        last, loop = object(), asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            r = await tab.send_command("Runtime.evaluate",
                                       params={"expression": expression, "returnByValue": True})
            value = r.get("result", {}).get("result", {}).get("value")
            if value == last:
                break
            last = value
            await asyncio.sleep(0.5)
        out.value = last
    return out


def check_page(path: str | Path, expression: str = PLOTS_JS, *, browser: str,
               timeout: float = 60) -> PageCheck:
    """Errors seen while ``path`` loads (opened as file://) and ``expression``'s settled value."""
    return asyncio.run(_check(Path(path).resolve().as_uri(), expression, browser, timeout))
