"""One module per `attnplug` command: each has `add_parser(subparsers)` and `run(args) -> exit status`."""

from __future__ import annotations

from . import bench, eval, generate, headhunt, listing, show_mask, train_lora

__all__ = ["COMMANDS"]

#: command modules in the order `attnplug --help` lists them
COMMANDS = (generate, listing, bench, show_mask, headhunt, eval, train_lora)
