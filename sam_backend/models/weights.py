"""Checkpoints: list, download (verified, resumable, atomic), random stand-ins, start-up download.

``sam-backend weights list | download NAME... | random NAME...``

A download goes to ``<weights dir>/<file name>.part`` and is put in place (``os.replace``) only
after three checks pass:

1. SAM's official file names carry the first hex digits of the file's SHA-256
   (``sam_vit_b_01ec64.pth``): the digest must start with them;
2. a SHA-256 given by the user (``--sha256``) or published by the mirror beside the file
   (``<file URL>.sha256``, ``HEX`` or ``HEX  file name``) must match;
3. the file must load into its architecture: no missing or unexpected key, no shape mismatch
   (this also catches truncated and wrong files).

A failed check removes the download. An interrupted download keeps its ``.part`` and the next
attempt resumes it with an HTTP ``Range`` request. ``SAM_BACKEND_WEIGHTS_URL`` sets a mirror (a base
URL under which the same file names are served); ``SAM_BACKEND_OFFLINE=1`` turns downloads off.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple, Union
from urllib.parse import quote, urlsplit, urlunsplit

from sam_backend.models import hub, registry
from sam_backend.errors import CheckpointError, ConfigError, SamBackendError
from sam_backend.models.registry import VARIANTS, Variant

log = logging.getLogger(__name__)

MIRROR_ENV = "SAM_BACKEND_WEIGHTS_URL"
OFFLINE_ENV = "SAM_BACKEND_OFFLINE"
DEFAULT_MODEL_NAME = "mobile_sam"

# Unreachable hosts must fail at once; a stalled transfer fails after READ_TIMEOUT and resumes.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
CHUNK = 1 << 20
_USER_AGENT = "sam-backend-weights/1"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_TRUE = {"1", "true", "yes", "on"}


# -- names ---------------------------------------------------------------------------------------
def _valid_names() -> str:
    return (f"a model_name ({', '.join(registry.model_names())}), model_name/sam_config "
            f"({', '.join(v.key for v in VARIANTS.values())}), a checkpoint file name "
            f"({', '.join(v.checkpoint_name for v in VARIANTS.values())}), or all")


def resolve_names(names: Iterable[str]) -> List[Variant]:
    """The variants named by ``names`` (model_name, model_name/sam_config, file name or ``all``),
    in order, without duplicates. Raises ConfigError for an unknown name, listing the valid ones."""
    names = [str(n).strip() for n in names]
    if not names:
        raise ConfigError(f"name a checkpoint: {_valid_names()}")
    found: List[Variant] = []
    for name in names:
        if name == "all":
            matches = list(VARIANTS.values())
        elif name in registry.DEFAULT_CONFIG:
            matches = [registry.get_variant(name)]
        elif name.count("/") == 1 and tuple(name.split("/")) in VARIANTS:
            matches = [VARIANTS[tuple(name.split("/"))]]
        else:
            by_file = [v for v in VARIANTS.values() if v.checkpoint_name == name]
            if not by_file:
                raise ConfigError(f"unknown checkpoint name {name!r}: use {_valid_names()}")
            matches = by_file
        for variant in matches:
            if variant not in found:
                found.append(variant)
    return found


def _blank(value: Optional[str]) -> bool:
    return value is None or str(value).strip() == ""


def infer_variant(model_name: Optional[str] = None, sam_config: Optional[str] = None,
                  checkpoint: Union[str, Path, None] = None) -> Variant:
    """The variant to run from the start-up options; ``sam_checkpoint_file`` alone is enough.

    - ``model_name`` given: ``registry.get_variant(model_name, sam_config)``; when ``sam_config``
      is not given and the checkpoint has the official name of one of that model's files, that
      file's config (``model_name=sam`` + ``sam_vit_h_4b8939.pth`` -> ``sam/vit_h``); SAM 2.0's
      files are recognised by name under their 2.1 config too (``sam_config=hiera_tiny`` +
      ``sam2_hiera_tiny.pt`` -> ``sam2/hiera_tiny_v2.0``).
    - ``model_name`` not given, checkpoint given: the variant whose official file name it has;
      an unknown file name is a ConfigError asking for ``model_name``.
    - neither: the product default, ``mobile_sam``.
    Empty strings count as not given (Label Studio passes them for unset options).
    """
    model_name = None if _blank(model_name) else str(model_name).strip()
    sam_config = None if _blank(sam_config) else str(sam_config).strip()
    checkpoint = None if _blank(checkpoint) else str(checkpoint).strip()
    by_file = registry.variant_for_file(checkpoint) if checkpoint else None

    if model_name:
        if sam_config is None and by_file is not None and by_file.model_name == model_name:
            return by_file
        if by_file is not None and by_file.key == f"{model_name}/{sam_config}_v2.0":
            # sam_config=hiera_tiny with SAM 2.0's sam2_hiera_tiny.pt: that file's layout
            log.info("%s is a SAM 2.0 checkpoint: running it as %s", checkpoint, by_file.key)
            return by_file
        variant = registry.get_variant(model_name, sam_config)
        if by_file is not None and by_file != variant:
            log.warning("sam_checkpoint_file %s is named like %s's checkpoint, but %s was asked "
                        "for; loading will tell whether it fits", checkpoint, by_file.key,
                        variant.key)
        return variant

    if checkpoint:
        if by_file is None:
            raise ConfigError(
                f"cannot tell which model sam_checkpoint_file={checkpoint} is for: its name is not "
                f"an official checkpoint name ({', '.join(v.checkpoint_name for v in VARIANTS.values())}). "
                f"Set model_name ({', '.join(registry.model_names())}) and sam_config"
            )
        if sam_config is not None and sam_config != by_file.sam_config:
            raise ConfigError(
                f"sam_config={sam_config} does not match sam_checkpoint_file={checkpoint}, which is "
                f"{by_file.key}'s checkpoint: drop sam_config or set model_name as well"
            )
        return by_file

    if sam_config is not None and (DEFAULT_MODEL_NAME, sam_config) not in VARIANTS:
        having = sorted(m for (m, c) in VARIANTS if c == sam_config)
        if having:
            raise ConfigError(f"sam_config={sam_config} given without model_name: set model_name "
                              f"({', '.join(having)})")
    return registry.get_variant(DEFAULT_MODEL_NAME, sam_config)


# -- where from, where to ------------------------------------------------------------------------
def safe_url(url: str) -> str:
    """``url`` without credentials, query string or fragment: fit for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def mirror_base() -> Optional[str]:
    base = os.environ.get(MIRROR_ENV, "").strip()
    return base or None


def source_url(variant: Variant) -> str:
    """Where ``variant``'s file is fetched from: ``<mirror>/<file name>``, else the official URL."""
    base = mirror_base()
    if not base:
        return variant.url
    parts = urlsplit(base)
    path = parts.path.rstrip("/") + "/" + quote(variant.checkpoint_name)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _sidecar_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path + ".sha256", parts.query, ""))


def offline_from_env() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _manual_message(variant: Variant, dest: Path, reason: str) -> str:
    tried = ""
    url = source_url(variant)
    if url != variant.url:
        tried = f" (mirror {safe_url(url)}, from {MIRROR_ENV})"
    return (
        f"cannot download {variant.key} checkpoint {variant.checkpoint_name}{tried}: {reason}. "
        f"To install it by hand, download {variant.url} on a machine with internet access and "
        f"copy it to {dest}; or set {MIRROR_ENV} to a mirror that serves {variant.checkpoint_name}"
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# -- progress ------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar on a terminal; elsewhere (the backend's log) a log line every ~10%."""

    def __init__(self, name: str, total: Optional[int], initial: int, enabled: bool):
        self.name, self.total, self.done = name, total, initial
        self.bar = None
        self.enabled = enabled
        self.next_log = 0.0
        if not enabled:
            return
        if sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                            unit_divisor=1024, desc=name, file=sys.stderr, leave=True)
        else:
            self._advance_threshold()
            if initial:
                log.info("%s: resuming at %s%s", name, _human(initial),
                         f" of {_human(total)}" if total else "")

    def _advance_threshold(self) -> None:
        if self.total:
            step = self.total / 10
            self.next_log = (int(self.done // step) + 1) * step
        else:
            step = 32 * 1024 * 1024
            self.next_log = (self.done // step + 1) * step

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_log:
            if self.total:
                log.info("%s: %3d%% (%s of %s)", self.name, int(100 * self.done / self.total),
                         _human(self.done), _human(self.total))
            else:
                log.info("%s: %s", self.name, _human(self.done))
            self._advance_threshold()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- download ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """One download per destination at a time, across threads and processes (e.g. several
    server workers starting at once). The lock file lives in the temp dir, not beside the
    weights."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock
        yield
        return
    key = hashlib.sha1(str(dest.absolute()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"sam_backend-download-{key}.lock"
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:  # e.g. another user's lock file: go on without the lock
        log.debug("no download lock (%s)", exc)
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _normalise_sha256(value: str, what: str) -> str:
    value = value.strip()
    if not _SHA256_RE.match(value):
        raise ConfigError(f"{what} must be 64 hex digits (a full SHA-256), got {value!r}")
    return value.lower()


def _session():
    import requests

    session = requests.Session()
    session.headers.update({"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    return session


def _get(session, url: str, variant: Variant, dest: Path, headers=None):
    """GET with stream=True; an unreachable host is a CheckpointError saying what to do."""
    import requests

    try:
        return session.get(url, headers=headers or {}, stream=True, allow_redirects=True,
                           timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except (requests.ConnectionError, requests.Timeout) as exc:
        reason = _connection_reason(exc)
        raise CheckpointError(_manual_message(variant, dest, f"{safe_url(url)} is unreachable "
                                                             f"({reason})")) from None
    except requests.RequestException as exc:
        raise CheckpointError(_manual_message(variant, dest, f"request to {safe_url(url)} failed "
                                                             f"({type(exc).__name__})")) from None


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "host name not found"),
                           ("nodename nor servname", "host name not found"),
                           ("Temporary failure in name resolution", "host name not found"),
                           ("No address associated", "host name not found"),
                           ("Network is unreachable", "network unreachable"),
                           ("timed out", "timed out"), ("Timeout", "timed out")):
        if needle in text:
            return reason
    return type(exc).__name__


def _published_sha256(session, url: str, variant: Variant, dest: Path) -> Optional[str]:
    """The SHA-256 the mirror publishes at ``<url>.sha256``; None if it publishes none."""
    side = _sidecar_url(url)
    response = _get(session, side, variant, dest)
    with response:
        if response.status_code in (403, 404, 410):
            log.debug("no published SHA-256 at %s (HTTP %d)", safe_url(side), response.status_code)
            return None
        if response.status_code != 200:
            raise CheckpointError(f"the mirror answered HTTP {response.status_code} for "
                                  f"{safe_url(side)}; cannot tell whether {variant.checkpoint_name} "
                                  f"is intact: try again later")
        text = response.raw.read(4096, decode_content=True).decode("utf-8", "replace")
    fields = text.split()
    if not fields or not _SHA256_RE.match(fields[0]):
        raise CheckpointError(f"{safe_url(side)} does not hold a SHA-256 (expected 'HEX' or "
                              f"'HEX  {variant.checkpoint_name}'): refusing to download unchecked")
    if len(fields) > 1 and os.path.basename(fields[-1].lstrip("*")) != variant.checkpoint_name:
        raise CheckpointError(f"{safe_url(side)} is the SHA-256 of {fields[-1]!r}, not of "
                              f"{variant.checkpoint_name}")
    return fields[0].lower()


def _parse_content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _fetch(session, url: str, variant: Variant, dest: Path, progress: bool) -> str:
    """Download ``url`` into ``dest``'s ``.part`` (resuming it if present); the SHA-256 of the
    whole file. An interrupted transfer keeps the ``.part`` and raises CheckpointError."""
    import requests

    part = _part_path(dest)
    name = variant.checkpoint_name
    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = _get(session, url, variant, dest, headers)
        with response:
            status = response.status_code
            if status == 416 and offset and attempt == 0:
                log.warning("%s: the server cannot resume at %s (HTTP 416); starting over",
                            name, _human(offset))
                part.unlink()
                continue
            total: Optional[int] = None
            if status == 206:
                start, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    if attempt == 0 and offset:
                        log.warning("%s: the server resumed at the wrong place; starting over", name)
                        part.unlink()
                        continue
                    raise CheckpointError(f"{safe_url(url)} sent a partial answer "
                                          f"({response.headers.get('Content-Range')!r}) that "
                                          f"was not asked for")
                mode = "ab"
            elif status == 200:
                if offset:
                    log.info("%s: the server does not resume downloads; starting over", name)
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            elif status == 404:
                raise CheckpointError(_manual_message(
                    variant, dest, f"{safe_url(url)} has no such file (HTTP 404)"))
            else:
                raise CheckpointError(_manual_message(
                    variant, dest, f"{safe_url(url)} answered HTTP {status}"))

            hasher = hashlib.sha256()
            if offset:
                with open(part, "rb") as existing:
                    for block in iter(lambda: existing.read(CHUNK), b""):
                        hasher.update(block)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if offset:
                log.info("resuming %s from %s at %s", name, safe_url(url), _human(offset))
            else:
                log.info("downloading %s from %s%s", name, safe_url(url),
                         f" ({_human(total)})" if total else "")
            bar = _Progress(name, total, offset, progress)
            received = offset
            try:
                with open(part, mode) as out:
                    try:
                        for chunk in response.iter_content(CHUNK):
                            if chunk:
                                out.write(chunk)
                                hasher.update(chunk)
                                received += len(chunk)
                                bar.update(len(chunk))
                    except requests.RequestException as exc:
                        raise CheckpointError(
                            f"download of {name} from {safe_url(url)} was interrupted after "
                            f"{_human(received)}{f' of {_human(total)}' if total else ''} "
                            f"({type(exc).__name__}); the partial file {part} is kept: download "
                            f"again to resume") from None
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise CheckpointError(f"cannot write {part}: {exc}") from None
            finally:
                bar.close()
            if total is not None and received != total:
                raise CheckpointError(
                    f"download of {name} from {safe_url(url)} stopped after {_human(received)} of "
                    f"{_human(total)}; the partial file {part} is kept: download again to resume")
            return hasher.hexdigest()
    raise CheckpointError(f"cannot resume or restart the download of {name} from {safe_url(url)}")


def _verify(variant: Variant, path: Path, digest: str, given: Optional[str],
            published: Optional[str], url: str) -> None:
    """The three checks on the downloaded file; CheckpointError naming the one that failed."""
    name = variant.checkpoint_name

    def fail(check: str, detail: str) -> None:
        raise CheckpointError(f"{name} from {safe_url(url)} failed {check}: {detail}. The "
                              f"download was removed; nothing was put in place")

    if variant.sha256_prefix and not digest.startswith(variant.sha256_prefix.lower()):
        fail("check 1 (the digest in its official name)",
             f"its SHA-256 {digest} does not start with {variant.sha256_prefix}, which the official "
             f"name carries: the file is corrupt or is not the official {name}")
    if given and digest != given:
        fail("check 2 (--sha256)", f"its SHA-256 is {digest}, expected {given}")
    if published and digest != published:
        fail(f"check 2 (the mirror's {name}.sha256)",
             f"its SHA-256 is {digest}, the mirror publishes {published}")
    from sam_backend.models.loading import check_fits, read_state_dict

    try:
        state = read_state_dict(path)
        model = variant.builder()
        check_fits(model, state, variant, path)
    except CheckpointError as exc:
        fail(f"check 3 (loads into {variant.key})", str(exc))
    finally:
        state = model = None  # noqa: F841 - free the weights before the backend loads them
        gc.collect()


def download(variant: Variant, dest_dir: Union[str, Path, None] = None,
             sha256: Optional[str] = None, force: bool = False, progress: bool = True) -> Path:
    """Fetch ``variant``'s checkpoint into ``dest_dir`` (default: the weights dir), verified.

    Returns the file's path. An existing file is kept unless ``force``. Raises CheckpointError
    when offline, when the source is unreachable (nothing is left behind), when the transfer is
    interrupted (the ``.part`` is kept for resuming) or when a check fails (the download is
    removed).
    """
    dest = (Path(dest_dir).expanduser() if dest_dir else registry.weights_dir()) \
        / variant.checkpoint_name
    if hub.hub_repo(variant):  # a hub-format directory (SAM 3)
        if sha256:
            raise ConfigError(f"--sha256 names one file's digest; {variant.key}'s checkpoint is a "
                              f"directory fetched from the model hub, verified by loading it")
        if offline_from_env() and not (hub.is_checkpoint_dir(dest) and not force):
            raise CheckpointError(hub.missing_message(variant, dest))
        return hub.download(variant, dest.parent, force=force, progress=progress)
    given = _normalise_sha256(sha256, "--sha256") if sha256 else None
    if dest.is_file() and not force:
        log.info("%s is already present at %s (force to download again)", variant.key, dest)
        return dest
    if offline_from_env():
        raise CheckpointError(_manual_message(variant, dest, f"{OFFLINE_ENV} is set, so downloads "
                                                             f"are turned off"))
    url = source_url(variant)
    started = time.monotonic()
    with _exclusive(dest), _session() as session:
        if dest.is_file() and not force:  # another process fetched it while we waited
            return dest
        published = _published_sha256(session, url, variant, dest) if mirror_base() else None
        digest = _fetch(session, url, variant, dest, progress)
        part = _part_path(dest)
        log.info("%s: verifying (digest checks, loads into %s)", variant.checkpoint_name,
                 variant.key)
        try:
            _verify(variant, part, digest, given, published, url)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
    log.info("%s: verified (sha256 %s) and saved to %s in %.0f s", variant.key, digest[:12],
             dest, time.monotonic() - started)
    return dest


def ensure_checkpoint(variant: Variant, checkpoint: Union[str, Path, None] = None,
                      offline: Optional[bool] = None) -> Path:
    """The checkpoint the backend will load, downloading it first if it is missing.

    ``checkpoint`` None means the default path (weights dir / official file name). A missing file
    is downloaded when it is the default path or carries the variant's official file name (into
    its own directory), unless offline (``offline``, else ``$SAM_BACKEND_OFFLINE``).
    """
    default = registry.default_checkpoint(variant)
    path = Path(checkpoint).expanduser() if not _blank(checkpoint) else default
    if hub.hub_repo(variant):
        return _ensure_hub_checkpoint(variant, path, default, offline)
    if path.is_file():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {path} is not a file")
    official = path.name == variant.checkpoint_name
    if not official and path.absolute() != default.absolute():
        raise CheckpointError(
            f"checkpoint {path} not found. It is not named like {variant.key}'s official "
            f"checkpoint ({variant.checkpoint_name}), so it is not downloaded: fix "
            f"sam_checkpoint_file, or leave it empty to use {default}"
        )
    if offline is None:
        offline = offline_from_env()
    if offline:
        raise CheckpointError(
            f"checkpoint {path} for {variant.key} is missing and downloads are off (offline). "
            f"Get it with `sam-backend weights download {variant.key}`"
            f"{f' --dir {path.parent}' if path.parent.absolute() != default.parent.absolute() else ''}"
            f" on a machine with internet access, or download {variant.url} and copy it to {path}"
        )
    log.info("checkpoint %s for %s is missing: downloading it", path, variant.key)
    return download(variant, dest_dir=path.parent, progress=True)


def _ensure_hub_checkpoint(variant: Variant, path: Path, default: Path,
                           offline: Optional[bool]) -> Path:
    """A hub-format checkpoint directory, downloaded first when missing (see ensure_checkpoint)."""
    if hub.is_checkpoint_dir(path):
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path} for {variant.key} is a file: {variant.key} loads "
                              f"from a hub-format directory (config.json + model.safetensors)")
    if path.name != variant.checkpoint_name and path.absolute() != default.absolute():
        raise CheckpointError(
            f"checkpoint directory {path} not found (or without config.json). It is not named like "
            f"{variant.key}'s checkpoint ({variant.checkpoint_name}), so it is not downloaded: fix "
            f"sam_checkpoint_file, or leave it empty to use {default}")
    if offline is None:
        offline = offline_from_env()
    if offline:
        raise CheckpointError(hub.missing_message(variant, path))
    log.info("checkpoint directory %s for %s is missing: downloading it", path, variant.key)
    return hub.download(variant, path.parent, progress=True)


# -- random stand-ins ----------------------------------------------------------------------------
RANDOM_WARNING = ("RANDOM WEIGHTS: {path} is a random-weight {key} checkpoint (seed {seed}) under "
                  "the official file name. Its masks are MEANINGLESS: use it only for tests, "
                  "benchmarks and offline demos, and delete it before serving real work.")


def write_random(variant: Variant, dest_dir: Union[str, Path, None] = None, seed: int = 0,
                 force: bool = False) -> Path:
    from sam_backend.models.random_init import make_random_checkpoint

    dest = (Path(dest_dir).expanduser() if dest_dir else registry.weights_dir()) \
        / variant.checkpoint_name
    if dest.exists() and not force:
        raise CheckpointError(f"{dest} already exists: not replacing it with random weights "
                              f"(use --force, or --dir to write elsewhere)")
    if hub.hub_repo(variant):
        from sam_backend.models.sam3_runtime import make_random_checkpoint_dir

        make_random_checkpoint_dir(dest, seed=seed)
    else:
        make_random_checkpoint(variant, dest, seed=seed)
    log.warning(RANDOM_WARNING.format(path=dest, key=variant.key, seed=seed))
    return dest


# -- command line --------------------------------------------------------------------------------
def _cmd_list(args) -> int:
    directory = Path(args.dir).expanduser() if args.dir else registry.weights_dir()
    base = mirror_base()
    print(f"weights directory: {directory}")
    print(f"downloads from:    "
          f"{safe_url(base) + '/<FILE> (mirror, ' + MIRROR_ENV + ')' if base else 'SOURCE URL'}")
    rows = [("NAME", "FILE", "PRESENT", "SOURCE URL")]
    for variant in VARIANTS.values():
        path = directory / variant.checkpoint_name
        part = _part_path(path)
        if path.is_file() or hub.is_checkpoint_dir(path):
            size = path.stat().st_size if path.is_file() else \
                sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            present = f"yes, {_human(size)}"
        elif part.is_file():
            present = f"partial, {_human(part.stat().st_size)}"
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
    failures: List[Tuple[Variant, SamBackendError]] = []
    for variant in variants:
        try:
            path = download(variant, dest_dir=args.dir, sha256=args.sha256, force=args.force,
                            progress=not args.quiet)
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
    listing.add_argument("--dir", help="weights directory (default: $SAM_BACKEND_WEIGHTS_DIR or "
                                       "weights/ of the repo)")
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
