"""``sam-backend weights list | download NAME... | random NAME...``: the checkpoints on the
command line (what :mod:`.checkpoints`, :mod:`.download` and :mod:`.random_init` do, for a person).

Whether downloads are allowed is read from the one settings object (``SAM_BACKEND_OFFLINE``, or
``--offline``), as for the server.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Tuple

from sam_backend.common.text import redact_url
from sam_backend.errors import CheckpointError, ConfigError, SamBackendError
from sam_backend.models import hub, registry
from sam_backend.models.checkpoints import resolve_names
from sam_backend.models.download import (MIRROR_ENV, OFFLINE_ENV, download, human_size, mirror_base,
                                         part_path)
from sam_backend.models.random_init import RANDOM_WARNING, write_random
from sam_backend.models.registry import VARIANTS, Variant

log = logging.getLogger(__name__)


def _cmd_list(args) -> int:
    directory = Path(args.dir).expanduser() if args.dir else registry.weights_dir()
    base = mirror_base()
    print(f"weights directory: {directory}")
    print(f"downloads from:    "
          f"{redact_url(base) + '/<FILE> (mirror, ' + MIRROR_ENV + ')' if base else 'SOURCE URL'}")
    rows = [("NAME", "FILE", "PRESENT", "SOURCE URL")]
    for variant in VARIANTS.values():
        path = directory / variant.checkpoint_name
        part = part_path(path)
        if path.is_file() or hub.is_checkpoint_dir(path):
            size = path.stat().st_size if path.is_file() else \
                sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            present = f"yes, {human_size(size)}"
        elif part.is_file():
            present = f"partial, {human_size(part.stat().st_size)}"
        else:
            present = "no"
        default = registry.DEFAULT_CONFIG.get(variant.model_name) == variant.sam_config
        rows.append((variant.key + (" *" if default else ""), variant.checkpoint_name, present,
                     variant.url))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    print("* the default sam_config of its model_name "
          "(download by model_name, model_name/sam_config, file name or all)")
    return 0


def _cmd_download(args) -> int:
    variants = resolve_names(args.names)
    if args.sha256 and len(variants) > 1:
        raise ConfigError("--sha256 names one file's digest: give a single checkpoint name with it")
    from sam_backend.settings import Settings

    offline = Settings.load({"offline": True} if args.offline else {}).offline
    failures: List[Tuple[Variant, SamBackendError]] = []
    for variant in variants:
        try:
            path = download(variant, dest_dir=args.dir, sha256=args.sha256, force=args.force,
                            progress=not args.quiet, offline=offline)
        except SamBackendError as exc:
            if len(variants) == 1:
                raise
            log.error("%s", exc)
            failures.append((variant, exc))
            continue
        print(f"{variant.key}: {path}")
    if failures:
        raise CheckpointError(f"{len(failures)} of {len(variants)} downloads failed: "
                              f"{', '.join(v.key for v, _ in failures)}")
    return 0


def _cmd_random(args) -> int:
    variants = resolve_names(args.names)
    for variant in variants:
        path = write_random(variant, dest_dir=args.dir, seed=args.seed, force=args.force)
        print(f"{variant.key}: {path}")
        print("WARNING: " + RANDOM_WARNING.format(path=path, key=variant.key, seed=args.seed),
              file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    weights = subparsers.add_parser(
        "weights", help="list, download and verify checkpoints",
        description="Checkpoints: list them, download them (verified, resumable), or write "
                    "random-weight stand-ins. NAME is a model_name (its default sam_config), "
                    "model_name/sam_config, a checkpoint file name, or all.")
    commands = weights.add_subparsers(dest="weights_command", required=True)

    listing = commands.add_parser("list", help="every known checkpoint and whether it is present")
    listing.add_argument("--dir", help="weights directory (default: $SAM_BACKEND_WEIGHTS_DIR, else "
                                       "weights/ of the clone; README: Weights)")
    listing.set_defaults(func=_cmd_list)

    fetch = commands.add_parser(
        "download", help="download checkpoints, verified",
        description=f"Download checkpoints into the weights directory, resuming partial downloads "
                    f"and verifying each file (name digest, SHA-256, loads into its architecture) "
                    f"before putting it in place. {MIRROR_ENV} sets a mirror base URL; "
                    f"{OFFLINE_ENV}=1 turns downloads off.")
    fetch.add_argument("names", nargs="+", metavar="NAME")
    fetch.add_argument("--sha256", help="the file's expected SHA-256 (64 hex digits)")
    fetch.add_argument("--dir", help="destination directory (default: the weights directory)")
    fetch.add_argument("--force", action="store_true", help="download even if the file exists")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.add_argument("--offline", action="store_true",
                       help=f"refuse to download (as {OFFLINE_ENV}=1 does): only check what is "
                            f"present")
    fetch.set_defaults(func=_cmd_download)

    rand = commands.add_parser(
        "random", help="write seeded random-weight checkpoints (meaningless masks)",
        description="Write seeded random-weight checkpoints of the real architectures under the "
                    "official file names, for tests, benchmarks and offline demos. Their masks "
                    "are meaningless.")
    rand.add_argument("names", nargs="+", metavar="NAME")
    rand.add_argument("--seed", type=int, default=0)
    rand.add_argument("--dir", help="destination directory (default: the weights directory)")
    rand.add_argument("--force", action="store_true", help="replace an existing file")
    rand.set_defaults(func=_cmd_random)
