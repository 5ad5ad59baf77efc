"""Argument types shared by the commands: each rejects a bad value with one message naming the option."""
from __future__ import annotations

import argparse

from dgguf.core.errors import DggufError
from dgguf.format.quant_types import FILE_TYPES


def read_text(path, what: str) -> str:
    """A UTF-8 text file named by an option (`what`: how to name it in the error)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DggufError(f"cannot read {what} {path}: {e}") from e


def type_name(v: str) -> str:
    if v.upper() not in FILE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown type {v!r}; choose one of: {', '.join(FILE_TYPES)}")
    return v.upper()


def integer(name: str, lo: int, hi: int):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be an integer in {lo}..{hi}, not {v!r}")
        return n
    return parse


def positive(name: str, hi: int = 2**31 - 1):
    return integer(name, 1, hi)


def number(name: str, zero: bool = False):
    """A finite number > 0 (>= 0 with zero)."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = -1.0
        if not (0 <= x if zero else 0 < x) or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a {'number >= 0' if zero else 'positive number'}, "
                                             f"not {v!r}")
        return x
    return parse


def add_cheaper_steps(p) -> None:
    """The decoder's cheaper-step options (approximations, off by default; docs/benchmarks.md has their cost)."""
    p.add_argument("--sc-top-k", type=integer("--sc-top-k", 0, 1 << 20), default=0, metavar="K",
                   help="self-condition on each position's K most probable tokens instead of the whole vocabulary "
                        "(0: exact)")
    p.add_argument("--head-reuse", type=number("--head-reuse", zero=True), default=0.0, metavar="NATS",
                   help="recompute the logits only of positions not yet settled (accepted, stable, entropy below "
                        "NATS; 0: exact)")


def cheaper_steps(a) -> dict:
    return {"sc_top_k": a.sc_top_k, "head_reuse": a.head_reuse}
