"""`dgguf run --visual`: the canvas being denoised, redrawn in place on a terminal.

Each decoder step redraws the canvas wrapped to the terminal's width: positions whose token settled since the
previous step in green, positions still changing dimmed, the tail of the committed text before them. The view
erases its own rows before each redraw (cursor up, clear to the end of the screen), so nothing else is touched;
it never draws more rows than the terminal has, and draws with autowrap off so that each row is one line.
Control characters in tokens are shown escaped (↵, →, \\xNN), so a token cannot move the cursor.
Off a terminal, one plain line per step is written instead.
"""
from __future__ import annotations

import shutil
import unicodedata

from dgguf.format.gguf_file import printable

GREEN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
_SHOWN = {"\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}


def shown(text: str) -> str:
    """A token's text for the view: newlines and tabs as arrows, every other control escaped (printable)."""
    return printable("".join(_SHOWN.get(ch, ch) for ch in text), None)


def width(text: str) -> int:
    """Terminal columns of printable text: wide (East Asian) characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def wrap(cells: list[tuple[str, str]], columns: int) -> list[list[tuple[str, str]]]:
    """(style, text) cells into rows of at most `columns` terminal columns; a cell wider than a row is cut."""
    rows, row, used = [], [], 0
    for style, text in cells:
        w = width(text)
        if used and used + w > columns:
            rows.append(row)
            row, used = [], 0
        if w > columns:
            text, w = text[:columns], columns
        row.append((style, text))
        used += w
    rows.append(row)
    return rows


class CanvasView:
    def __init__(self, model, out, tty: bool | None = None):
        self.model, self.out = model, out
        self.tty = out.isatty() if tty is None else tty
        self.pieces: dict[int, str] = {}
        self.previous = None
        self.committed: list[int] = []
        self.step_no = 0
        self.rows = 0

    def _piece(self, i: int) -> str:
        if i not in self.pieces:
            text = self.model.tokenizer.decode([i], special=True) if self.model.has_tokenizer else f"[{i}]"
            self.pieces[i] = shown(text) or "\u00b7"
        return self.pieces[i]

    def _erase(self) -> None:
        if self.rows:
            self.out.write("\r" + (f"\x1b[{self.rows - 1}A" if self.rows > 1 else "") + "\x1b[J")
            self.rows = 0

    def step(self, canvas_index: int, canvas) -> None:
        canvas = [int(i) for i in canvas]
        changed = [self.previous is None or a != b for a, b in zip(canvas, self.previous or canvas)]
        self.step_no += 1
        head = f"[canvas {canvas_index}, step {self.step_no}: {sum(changed)}/{len(canvas)} changing] "
        self.previous = canvas
        if not self.tty:
            self.out.write(head + "".join(self._piece(i) for i in canvas) + "\n")
            self.out.flush()
            return
        columns, lines = shutil.get_terminal_size((80, 24))
        tail = shown(self.model.tokenizer.decode(self.committed[-64:]) if self.model.has_tokenizer else "")
        cells = [(BOLD, head)] + [("", ch) for ch in tail[-columns:]] + ([("", " | ")] if tail else [])
        cells += [(DIM if c else GREEN, self._piece(i)) for i, c in zip(canvas, changed)]
        rows = wrap(cells, max(columns - 1, 8))[-max(lines - 1, 1):]
        self._erase()
        # autowrap off while drawing: a row the terminal measures wider than we do (its locale, its width
        # tables) is cut at the edge instead of wrapping, so the view is always exactly len(rows) lines
        self.out.write("\x1b[?7l" + "\n".join("".join(f"{s}{t}{RESET}" if s else t for s, t in row) for row in rows)
                       + "\x1b[?7h")
        self.out.flush()
        self.rows = len(rows)

    def commit(self, ids) -> None:
        self.committed.extend(ids)
        self.previous = None
        self.step_no = 0

    def close(self) -> None:
        if self.tty:
            self._erase()
            self.out.flush()
