"""The on-disk byte cache of downloaded images, so that a restarted process does not download again.

Files are named by the SHA-256 of the image's identity (the absolute Label Studio URL, the cloud
URI, or the http URL). The loader stores only bytes whose header reads as an image, never local
files. The cache is bounded by ``max_bytes``: after each store, least-recently-used files (by
mtime; a hit touches the file) are deleted until the total fits. Cached URLs are assumed immutable
(Label Studio upload names carry a UUID). Writes are atomic
(:func:`~sam_backend.common.files.atomic_path`): readers in other processes see a whole file or none.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

from sam_backend.common.files import atomic_path

logger = logging.getLogger(__name__)


def text_digest(text: str) -> str:
    """Hex SHA-256 of ``text`` (UTF-8, lone surrogates kept)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sam_backend", "images")


class DiskCache:
    """Bytes keyed by a string, one file per key, bounded in total bytes, LRU by mtime."""

    SUFFIX = ".img"

    def __init__(self, directory: str, max_bytes: int):
        self.directory = Path(os.path.expanduser(directory))
        self.max_bytes = int(max_bytes)

    def path_for(self, key: str) -> Path:
        return self.directory / (text_digest(key) + self.SUFFIX)

    def get(self, key: str) -> Optional[bytes]:
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("Image cache: cannot read %s (%s); ignoring it", path, exc)
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return data

    def discard(self, key: str) -> None:
        try:
            self.path_for(key).unlink()
        except OSError:
            pass

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            logger.debug("Image cache: %d bytes exceed the cache bound; not cached", len(data))
            return
        path = self.path_for(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        except OSError as exc:
            logger.warning("Image cache: cannot write to %s (%s); continuing without caching",
                           self.directory, exc)
            return
        self.evict(keep=path)

    def total_bytes(self) -> int:
        return sum(size for _p, size, _m in self._entries())

    def _entries(self):
        """(path, size, mtime_ns) of the cached files (temporaries of writes under way excluded:
        they do not end in SUFFIX)."""
        out = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if not entry.name.endswith(self.SUFFIX) or entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    out.append((Path(entry.path), st.st_size, st.st_mtime_ns))
        except OSError:
            pass
        return out

    def evict(self, keep: Optional[Path] = None) -> int:
        """Delete least recently used files until the total fits; returns how many went."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _p, size, _m in entries)
        removed = 0
        for path, size, _mtime in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("Image cache: cannot delete %s (%s)", path, exc)
                continue
            total -= size
            removed += 1
        if removed:
            logger.debug("Image cache: evicted %d file(s); %d bytes remain", removed, total)
        return removed


__all__ = ["DiskCache", "default_cache_dir", "text_digest"]
