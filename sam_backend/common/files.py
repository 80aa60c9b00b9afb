"""Files written by several processes at once (checkpoints, ONNX graphs, digests, the image
disk cache, exports): one inter-process lock and one atomic write for the whole package."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Union

from filelock import FileLock, Timeout

PathLike = Union[str, Path]


@contextlib.contextmanager
def file_lock(path: PathLike, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file, created if needed) across threads and
    processes. ``timeout`` in seconds (None: wait for ever); raises ``filelock.Timeout``."""
    lock = FileLock(str(path), timeout=-1 if timeout is None else timeout)
    with lock:
        yield


def temp_lock_path(key: str, purpose: str) -> Path:
    """A lock file in the temp dir named after ``key`` (e.g. a destination that may be read-only),
    so that locking never writes beside the thing it protects."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sam_backend-{purpose}-{digest}.lock"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` in one
    ``os.replace`` (readers see the old file or the new one, never a part), on failure it is
    removed. Unique per process and thread, so concurrent writers never share a temporary. The
    temporary may also be made a directory (replacing ``path`` then needs it absent or empty)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def _files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def sha256_of(path: PathLike, chunk: int = 8 << 20) -> str:
    """Hex SHA-256 of a file; of a directory (a hub-format checkpoint), over each file's relative
    name and digest, in name order."""
    path = Path(path)
    hasher = hashlib.sha256()
    if path.is_dir():
        for file in _files(path):
            hasher.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\n".encode())
        return hasher.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            hasher.update(block)
    return hasher.hexdigest()


def stamp_of(path: PathLike) -> dict:
    """What tells a file (or a directory's files) changed without reading it: total size and
    newest mtime in ns."""
    path = Path(path)
    stats = [p.stat() for p in _files(path)] if path.is_dir() else [path.stat()]
    return {"size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


__all__ = ["Timeout", "atomic_path", "atomic_write", "file_lock", "sha256_of", "stamp_of",
           "temp_lock_path"]
