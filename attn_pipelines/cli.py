"""`attnplug` command line: generate | list | bench | show-mask | headhunt | eval (one module per command in
`commands/`).

    attnplug generate                                   # embedded tiny default, no download
    attnplug generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a fox" --attn radial --out fox.mp4
    attnplug generate --config wan2.1-t2v-14b-radial --steps 30     # preset + overrides
    attnplug list
    attnplug show-mask --variant radial:decay_factor=1 --grid 8x4x6 --text-len 4 --family wan --out mask.png
    attnplug bench --smoke

Errors print one `attnplug: error: ...` line, never a traceback: bad input (flags, variants and
their options, presets, an unwritable --out, an uncached model offline) exits with status 2; a
run that fails after its input was accepted (a failed write, a failed benchmark) with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from attn_spec import SpecError

from . import __version__
from .commands import COMMANDS
from .errors import CLIError, RunError

__all__ = ["main", "build_parser", "CLIError"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `attnplug generate: error: ... (see attnplug generate --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `attnplug` (exposed for docs and tests)."""
    names = ", ".join(c.__name__.rsplit(".", 1)[-1].replace("listing", "list").replace("_", "-") for c in COMMANDS)
    p = _Parser(prog="attnplug", description=f"Attention variants for diffusers pipelines and timm models: {names}.")
    p.add_argument("--version", action="version", version=f"attnplug {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attnplug` console script; returns the exit status."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        return int(args.func(args) or 0)
    except (CLIError, SpecError) as e:
        print(f"attnplug: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"attnplug: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnplug: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
