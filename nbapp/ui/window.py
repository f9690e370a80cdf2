"""The browser window's size, read once the page shows the app (the kernel cannot ask for it).

A hidden text box receives ``WIDTHxHEIGHT`` from one line of JavaScript (run, like
:class:`nbapp.ui.app.Scroller`'s, as the output of a widget of the kernel's own), typed into it
as a user would type, so that the box's value comes back to the kernel as any edit does.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable

import ipywidgets as W

__all__ = ["WindowSize", "parse_size"]

_ids = itertools.count(1)


def parse_size(text: str) -> tuple[int, int] | None:
    """``(width, height)`` of a ``"WIDTHxHEIGHT"`` text in a plausible range, else None.

    >>> parse_size("1366x768"), parse_size("0x0"), parse_size("x"), parse_size("99999x700")
    ((1366, 768), None, None, None)
    """
    m = re.fullmatch(r"\s*(\d{1,5})x(\d{1,5})\s*", text or "")
    if not m:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    return (w, h) if 200 <= w <= 16000 and 200 <= h <= 16000 else None


class WindowSize:
    """Calls ``on_size(width, height)`` (CSS pixels) when the page reports its window size."""

    def __init__(self, on_size: Callable[[int, int], None]):
        self.on_size = on_size
        self.css_class = f"nbapp-window-size-{next(_ids)}"
        self.box = W.Text(value="", continuous_update=True)
        self.box.add_class(self.css_class)
        self.script = W.Output()
        self.widget = W.Box([self.box, self.script], layout=W.Layout(display="none"))
        self.size: tuple[int, int] | None = None
        self.box.observe(self._typed, names=["value"])

    def measure(self) -> None:
        """Ask the page for its window size (answered when the widgets are shown)."""
        from IPython.display import Javascript

        self.script.outputs = ()
        self.script.append_display_data(Javascript(
            "(function ask(n) { const e = document.querySelector('." + self.css_class
            + " input'); if (!e) { if (n > 0) setTimeout(() => ask(n - 1), 250); return; } "
            "e.value = innerWidth + 'x' + innerHeight; "
            "e.dispatchEvent(new Event('input', {bubbles: true})); })(80);"))

    def _typed(self, change) -> None:
        size = parse_size(change.new)
        if size is not None:
            self.size = size
            self.on_size(*size)
