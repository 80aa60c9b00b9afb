"""Checkpoint downloads: verified, resumable, atomic, one at a time per destination.

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
URL under which the same file names are served). Checkpoints that are model-hub repositories
(SAM 3) are fetched by :mod:`.hub`. Whether downloads are allowed at all is the caller's
``offline`` (``Settings.offline``: the option, else ``SAM_BACKEND_OFFLINE``); nothing here reads
it from the environment.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import quote, urlsplit, urlunsplit

from sam_backend.common.files import file_lock, temp_lock_path
from sam_backend.common.text import redact_url
from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models import hub, registry
from sam_backend.models.registry import Variant

log = logging.getLogger(__name__)

MIRROR_ENV = "SAM_BACKEND_WEIGHTS_URL"
OFFLINE_ENV = "SAM_BACKEND_OFFLINE"

# Unreachable hosts must fail at once; a stalled transfer fails after READ_TIMEOUT and resumes.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
CHUNK = 1 << 20
_USER_AGENT = "sam-backend-weights/1"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


# -- where from, where to ------------------------------------------------------------------------
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


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _manual_message(variant: Variant, dest: Path, reason: str) -> str:
    tried = ""
    url = source_url(variant)
    if url != variant.url:
        tried = f" (mirror {redact_url(url)}, from {MIRROR_ENV})"
    return (
        f"cannot download {variant.key} checkpoint {variant.checkpoint_name}{tried}: {reason}. "
        f"To install it by hand, download {variant.url} on a machine with internet access and "
        f"copy it to {dest}; or set {MIRROR_ENV} to a mirror that serves {variant.checkpoint_name}"
    )


def human_size(n: float) -> str:
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
                log.info("%s: resuming at %s%s", name, human_size(initial),
                         f" of {human_size(total)}" if total else "")

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
                         human_size(self.done), human_size(self.total))
            else:
                log.info("%s: %s", self.name, human_size(self.done))
            self._advance_threshold()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- download ------------------------------------------------------------------------------------
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
        raise CheckpointError(_manual_message(variant, dest, f"{redact_url(url)} is unreachable "
                                                             f"({reason})")) from None
    except requests.RequestException as exc:
        raise CheckpointError(_manual_message(variant, dest, f"request to {redact_url(url)} failed "
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
            log.debug("no published SHA-256 at %s (HTTP %d)", redact_url(side), response.status_code)
            return None
        if response.status_code != 200:
            raise CheckpointError(f"the mirror answered HTTP {response.status_code} for "
                                  f"{redact_url(side)}; cannot tell whether {variant.checkpoint_name} "
                                  f"is intact: try again later")
        text = response.raw.read(4096, decode_content=True).decode("utf-8", "replace")
    fields = text.split()
    if not fields or not _SHA256_RE.match(fields[0]):
        raise CheckpointError(f"{redact_url(side)} does not hold a SHA-256 (expected 'HEX' or "
                              f"'HEX  {variant.checkpoint_name}'): refusing to download unchecked")
    if len(fields) > 1 and os.path.basename(fields[-1].lstrip("*")) != variant.checkpoint_name:
        raise CheckpointError(f"{redact_url(side)} is the SHA-256 of {fields[-1]!r}, not of "
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

    part = part_path(dest)
    name = variant.checkpoint_name
    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = _get(session, url, variant, dest, headers)
        with response:
            status = response.status_code
            if status == 416 and offset and attempt == 0:
                log.warning("%s: the server cannot resume at %s (HTTP 416); starting over",
                            name, human_size(offset))
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
                    raise CheckpointError(f"{redact_url(url)} sent a partial answer "
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
                    variant, dest, f"{redact_url(url)} has no such file (HTTP 404)"))
            else:
                raise CheckpointError(_manual_message(
                    variant, dest, f"{redact_url(url)} answered HTTP {status}"))

            hasher = hashlib.sha256()
            if offset:
                with open(part, "rb") as existing:
                    for block in iter(lambda: existing.read(CHUNK), b""):
                        hasher.update(block)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if offset:
                log.info("resuming %s from %s at %s", name, redact_url(url), human_size(offset))
            else:
                log.info("downloading %s from %s%s", name, redact_url(url),
                         f" ({human_size(total)})" if total else "")
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
                            f"download of {name} from {redact_url(url)} was interrupted after "
                            f"{human_size(received)}{f' of {human_size(total)}' if total else ''} "
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
                    f"download of {name} from {redact_url(url)} stopped after {human_size(received)} of "
                    f"{human_size(total)}; the partial file {part} is kept: download again to resume")
            return hasher.hexdigest()
    raise CheckpointError(f"cannot resume or restart the download of {name} from {redact_url(url)}")


def _verify(variant: Variant, path: Path, digest: str, given: Optional[str],
            published: Optional[str], url: str) -> None:
    """The three checks on the downloaded file; CheckpointError naming the one that failed."""
    name = variant.checkpoint_name

    def fail(check: str, detail: str) -> None:
        raise CheckpointError(f"{name} from {redact_url(url)} failed {check}: {detail}. The "
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
             sha256: Optional[str] = None, force: bool = False, progress: bool = True,
             offline: bool = False) -> Path:
    """Fetch ``variant``'s checkpoint into ``dest_dir`` (default: the weights dir), verified.

    Returns the file's path. An existing file is kept unless ``force``. ``offline`` (the caller's
    ``Settings.offline``) turns downloads off. Raises CheckpointError when offline, when the
    source is unreachable (nothing is left behind), when the transfer is
    interrupted (the ``.part`` is kept for resuming) or when a check fails (the download is
    removed).
    """
    dest = (Path(dest_dir).expanduser() if dest_dir else registry.weights_dir()) \
        / variant.checkpoint_name
    if hub.hub_repo(variant):  # a hub-format directory (SAM 3)
        if sha256:
            raise ConfigError(f"--sha256 names one file's digest; {variant.key}'s checkpoint is a "
                              f"directory fetched from the model hub, verified by loading it")
        if offline and not (hub.is_checkpoint_dir(dest) and not force):
            raise CheckpointError(hub.missing_message(variant, dest))
        return hub.download(variant, dest.parent, force=force, progress=progress)
    given = _normalise_sha256(sha256, "--sha256") if sha256 else None
    if dest.is_file() and not force:
        log.info("%s is already present at %s (force to download again)", variant.key, dest)
        return dest
    if offline:
        raise CheckpointError(_manual_message(variant, dest, f"downloads are off (offline=true or "
                                                             f"{OFFLINE_ENV}=1)"))
    url = source_url(variant)
    started = time.monotonic()
    # One download per destination at a time, across threads and processes (several server
    # workers starting at once); the lock file lives in the temp dir, not beside the weights.
    with file_lock(temp_lock_path(str(dest.absolute()), "download")), _session() as session:
        if dest.is_file() and not force:  # another process fetched it while we waited
            return dest
        published = _published_sha256(session, url, variant, dest) if mirror_base() else None
        digest = _fetch(session, url, variant, dest, progress)
        part = part_path(dest)
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


