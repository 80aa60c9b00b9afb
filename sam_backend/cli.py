"""``sam-backend``: serve the backend, manage checkpoints, export COCO and YOLO datasets.

Each command lives in the module that owns the feature and registers itself here through a
``register_cli(subparsers)`` function.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Dict, List, Optional, Tuple

from sam_backend.errors import SamBackendError

# module -> the commands it registers (named here too, so that a module that cannot be imported
# still has its commands answer, with why)
COMMAND_MODULES: Dict[str, Tuple[str, ...]] = {
    "sam_backend.server.app": ("serve",),
    "sam_backend.commands.weights": ("weights",),
    "sam_backend.export.cli": ("export-coco", "export-yolo", "export-video-coco",
                               "export-mot"),
    "sam_backend.export.preview": ("preview",),
    "sam_backend.commands.precompute": ("worker", "precompute"),
    "sam_backend.commands.annotate": ("annotate",),
    "sam_backend.commands.track": ("track",),
    "sam_backend.commands.train": ("train",),
}


def import_failure(module: str, exc: BaseException) -> str:
    """What a user reads when ``module`` could not be imported: the missing module when that is
    the cause, else the error."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"importing {module} failed: the module {exc.name!r} is missing ({exc})"
    return f"importing {module} failed: {type(exc).__name__}: {exc}"


def _unavailable(subparsers, command: str, why: str, exc: BaseException) -> None:
    """``command`` whose module failed to import: it takes any arguments and exits 2 with ``why``
    (the other commands still work)."""
    parser = subparsers.add_parser(command, help=f"UNAVAILABLE: {why}", add_help=False,
                                   prefix_chars="\0")  # every argument is positional
    parser.add_argument("arguments", nargs="*")

    def fail(_args) -> int:
        logging.getLogger(__name__).debug("the import's traceback", exc_info=exc)
        raise SamBackendError(f"sam-backend {command} is unavailable: {why}. Install what is "
                              "missing (pip install -e . in the repository); --log-level DEBUG "
                              "shows the import's traceback")

    parser.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-backend", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, commands in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - said loudly when one of its commands is used
            for command in commands:
                _unavailable(subparsers, command, import_failure(name, exc), exc)
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
