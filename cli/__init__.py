"""The `dgguf` command: one module per command (convert and quantize, inspect, run, bench, eval, plan).

User errors print one line, `error: <message>`, and exit 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys

from dgguf.core.errors import DggufError

from . import bench, convert, eval, inspect, plan, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgguf", description="DiffusionGemma GGUF converter and runtime")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    convert.add_parsers(sub)
    run.add_parser(sub)
    bench.add_parser(sub)
    eval.add_parser(sub)
    plan.add_parser(sub)
    inspect.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DggufError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
