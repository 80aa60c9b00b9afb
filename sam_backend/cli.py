"""``sam-backend``: serve the backend, manage checkpoints, export COCO and YOLO datasets.

Each command lives in the module that owns the feature and registers itself here through a
``register_cli(subparsers)`` function.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from sam_backend.errors import SamBackendError

# module -> the feature it adds to the command line
COMMAND_MODULES = ["sam_backend.server.app", "sam_backend.commands.weights", "sam_backend.export.cli",
                   "sam_backend.commands.precompute", "sam_backend.commands.annotate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-backend", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except SamBackendError as exc:
        logging.getLogger("sam_backend").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
