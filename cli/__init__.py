"""The `dgguf` command: one module per command (convert and quantize, inspect, run, bench, eval, plan).

User errors print one line, `error: <message>`, and exit 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import sys

from dgguf.core.errors import DggufError

from . import bench, card, convert, eval, imatrix, inspect, plan, run, serve, verify


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a misspelt option ("did you mean --threads?") and exit status 2."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            known = [o for a in self._actions for o in a.option_strings]
            for sub in self._subparsers._group_actions if self._subparsers else []:
                for p in sub.choices.values():
                    known += [o for a in p._actions for o in a.option_strings]
            hints = []
            for word in message.split(": ", 1)[1].split():
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from dgguf.core import native
    try:
        v = version("dgguf")
    except PackageNotFoundError:   # run from a source tree without installing
        v = "unknown"
    return f"dgguf {v} (CPU features: {native.cpu_features()}, matmul kernel {native.matmul_kernel()})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dgguf", description="DiffusionGemma GGUF converter and runtime")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (allowed anywhere on the line)")
    p.add_argument("--version", action="store_true", help="print the version and CPU features, then exit")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    convert.add_parsers(sub)
    run.add_parser(sub)
    bench.add_parser(sub)
    eval.add_parser(sub)
    plan.add_parser(sub)
    inspect.add_parser(sub)
    serve.add_parser(sub)
    verify.add_parser(sub)
    card.add_parser(sub)
    imatrix.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    if argv[:1] == ["--version"]:
        print(_version())
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("error: a command is required", file=sys.stderr)
        return 2
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
    except run.Interrupted:   # what was committed is already printed
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
