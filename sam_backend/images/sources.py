"""What a task's image URL means: where its bytes are, and the image's identity.

* ``/data/upload/...`` and other Label-Studio-relative URLs (``/data/``, ``/storage-data/``,
  ``/tasks/``, ``/projects/``; ``upload/...`` of old exports means ``/data/upload/...``):
  downloaded from Label Studio (its address and credentials: :mod:`.credentials`). An absolute
  URL whose host:port is Label Studio's (as configured, or as sent in ``/setup`` -- they differ
  when Label Studio calls itself ``localhost`` but the backend reaches it as
  ``label-studio:8080``) and whose path is one of those is treated as the relative URL, fetched
  from the configured address.
* ``/data/local-files/?d=<path>``: read straight from ``LOCAL_FILES_DOCUMENT_ROOT`` when it is set
  (paths that escape it are refused; a path whose symbolic links lead out of the root counts as
  not there; if the file is not there and Label Studio is known, it is downloaded from Label
  Studio instead, with a warning), else downloaded from Label Studio.
* ``s3://``, ``gs://``, ``azure-blob://``: Label Studio presigns them
  (``GET /tasks/<id>/presign/?fileuri=<urlsafe base64>``, answered with a redirect to the storage
  or with the bytes themselves); needs the task id.
* ``http(s)://``: downloaded (:mod:`.fetch`).
* plain paths and ``file://`` URLs: only inside ``LOCAL_FILES_DOCUMENT_ROOT`` (relative paths are
  relative to it); without it they are off. ``data:`` URLs.

Local files (all three forms) are read here, only when they are regular files (never devices,
FIFOs or sockets) inside the document root once every symbolic link is resolved (links that stay
inside keep working; ``etclink -> /etc`` does not make ``etclink/shadow`` readable), with the same
byte limit as downloads. The file is opened once and the descriptor is what is checked, so a file
swapped for a link after the check is not read. Any local path that is refused or cannot be read
gives one message that does not say whether or what exists there.

A new kind of image source goes here: a :class:`Source` kind, its resolution and its key.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit, urlunsplit
from urllib.request import url2pathname

from sam_backend.common.limits import Reservation
from sam_backend.common.text import redact_url
from sam_backend.errors import ConfigError, ImageError
from sam_backend.images import messages
from sam_backend.images.disk_cache import text_digest

if TYPE_CHECKING:
    from sam_backend.images.credentials import LabelStudioAccess

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
# Paths Label Studio serves itself (uploads, local files, file storage, presign/resolve endpoints).
LS_RELATIVE_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/projects/")


def normalise_base_url(url: str, what: str) -> str:
    """``label-studio:8080/`` -> ``http://label-studio:8080``; ConfigError naming ``what``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL: {redact_url(url)!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{what} must be an http(s) URL such as http://label-studio:8080, got {redact_url(url)!r}"
        )
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def origin(url: str) -> Optional[Tuple[str, int]]:
    """(host, port) with the scheme's default port filled in; None if not http(s)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    return parts.hostname.lower(), port


def _normalise_http_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == (443 if scheme == "https" else 80) else f"{host}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


_OPEN_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))


class UnknownLabelStudio(ImageError):
    """A Label-Studio-relative URL, but no Label Studio address is configured yet."""


@dataclass(frozen=True)
class Media:
    """What a source's bytes are for: how messages name it (``noun``), the byte limit of its
    download or local file (``max_bytes``; None: the loader's ``max_download_bytes``) and the
    option that sets that limit (``limit``, named in the message); the seconds a whole download
    may take (``timeout``; None: the loader's ``timeout``) and its option (``timeout_option``)."""

    noun: str = "image"
    max_bytes: Optional[int] = None
    limit: str = "SAM_BACKEND_MAX_IMAGE_BYTES"
    timeout: Optional[float] = None
    timeout_option: str = "SAM_BACKEND_IMAGE_TIMEOUT"


IMAGE = Media()


@dataclass
class Source:
    """A task's image (or video: ``media``) URL, resolved."""

    kind: str  # "local" | "data" | "ls" | "cloud" | "http"
    url: str  # the task's URL as given (stripped)
    display: str  # redacted, for messages and logs
    path: Optional[str] = None  # local file
    fetch_url: Optional[str] = None  # first URL to GET
    cache_key: Optional[str] = None  # disk-cache key (downloads only)
    note: str = ""  # extra context for error messages
    key: str = ""  # the image's identity (:meth:`Sources.locate`)
    problem: Optional[ImageError] = None  # cannot be fetched yet: raised when it is
    media: Media = IMAGE  # what the bytes are for (names, byte limit)


class Sources:
    """Resolves task image URLs (module docstring) and reads the local and ``data:`` ones."""

    def __init__(self, access: "LabelStudioAccess", document_root: Optional[str],
                 max_bytes: int, local_paths_anywhere: bool = False):
        self.access = access
        self.doc_root = os.path.abspath(os.path.expanduser(document_root)) if document_root else None
        self.max_bytes = max_bytes
        self._local_anywhere = local_paths_anywhere

    # ---- identity ------------------------------------------------------------------------

    def locate(self, url: str, task_id: Optional[int] = None) -> Source:
        """The source behind ``url`` with its identity (``key``), computed without downloading:
        the normalised URL (query values hashed when they may hold credentials); for local
        files, the absolute path plus size and mtime; for a cloud URI, the URI. What prevents a
        download but not the key (Label Studio's address not known yet, a cloud URI without a
        task id) is kept in ``problem``, raised when the image is fetched."""
        try:
            scheme = urlsplit(url.strip()).scheme.lower() if isinstance(url, str) else ""
        except ValueError:
            raise ImageError(f"image URL {redact_url(url)} is not a valid URL") from None
        try:
            src = self.resolve(url, task_id)
        except ImageError as exc:
            if scheme in CLOUD_SCHEMES:  # the object's identity; presigning needs the task id
                src = Source("cloud", url.strip(), redact_url(url.strip()), problem=exc)
            elif isinstance(exc, UnknownLabelStudio):  # must not prevent keying a relative URL
                src = Source("ls", url.strip(), redact_url(url.strip()), cache_key=url.strip(),
                             problem=exc)
            else:
                raise
        src.key = self._key(src)
        return src

    def _key(self, src: Source) -> str:
        if src.kind == "cloud":
            return src.url
        if src.kind == "local":
            try:
                st = os.stat(src.path)
            except (OSError, ValueError):
                raise self.local_error(src) from None
            return f"file://{src.path}?size={st.st_size}&mtime_ns={st.st_mtime_ns}"
        if src.kind == "data":
            return "data:sha256=" + text_digest(src.url)
        key = src.cache_key or src.url
        if src.kind == "ls" and not key.startswith(("http://", "https://")):
            return "label-studio:" + key
        if urlsplit(key).query and redact_url(key) != key:
            return f"{redact_url(key)}#sha256={text_digest(key)[:32]}"
        return key

    # ---- resolving -----------------------------------------------------------------------

    def resolve(self, url: str, task_id: Optional[int]) -> Source:
        if not isinstance(url, str) or not url.strip():
            raise ImageError(f"the task's image URL is empty or not a string ({type(url).__name__})")
        url = url.strip()
        display = redact_url(url)
        if url[:5].lower() == "data:":
            return Source("data", url, display, cache_key=None)
        try:
            return self._classify(url, display, task_id)
        except ValueError:  # a port out of range, an unclosed [IPv6 literal, a NUL, ...
            raise ImageError(f"image URL {display} is not a valid URL") from None

    def _classify(self, url: str, display: str, task_id: Optional[int]) -> Source:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._resolve_cloud(url, display, task_id)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise messages.unavailable(display)
            return self._local_source(url, display, url2pathname(parts.path))
        if scheme in ("http", "https"):
            rel = self._as_ls_relative(parts)
            if rel is not None:
                return self._resolve_relative(rel, display)
            return Source("http", url, display, fetch_url=url, cache_key=_normalise_http_url(url))
        if len(scheme) > 1:
            raise ImageError(
                f"image URL {display} has an unsupported scheme {scheme!r}: use http(s), s3, gs, "
                "azure-blob, a Label Studio /data/... URL or a local path"
            )
        # No scheme (or a Windows drive letter): Label-Studio-relative or a local path.
        if url.startswith(("upload/", "/upload/")):  # old Label Studio exports
            url = "/data" + ("" if url.startswith("/") else "/") + url
        if url.startswith(LS_RELATIVE_PREFIXES):
            return self._resolve_relative(url, display)
        return self._local_source(url, display, url)

    def _as_ls_relative(self, parts) -> Optional[str]:
        """The Label-Studio-relative part of an absolute URL on Label Studio's host (the address
        from the settings or the one sent in /setup, which may differ, e.g. in Docker)."""
        target = origin(urlunsplit(parts))
        for base in (self.access.env_url, self.access.setup_url):
            if not base or origin(base) != target:
                continue
            base_path = urlsplit(base).path
            if not parts.path.startswith(base_path + "/"):
                continue
            rel = parts.path[len(base_path):]
            if rel.startswith(LS_RELATIVE_PREFIXES):
                return rel + (f"?{parts.query}" if parts.query else "")
        return None

    def _resolve_relative(self, rel: str, display: str) -> Source:
        if rel.startswith("/data/local-files"):
            return self._resolve_local_files(rel, display)
        return self._ls_source(rel, display)

    def _ls_source(self, rel_url: str, display: str, note: str = "") -> Source:
        ls = self.access.url
        if not ls:
            raise UnknownLabelStudio(
                f"image URL {display} is relative to Label Studio, but the Label Studio address is "
                "unknown: set LABEL_STUDIO_URL in the backend's environment (e.g. "
                "http://label-studio:8080, as reachable from the backend), or let Label Studio "
                "call /setup, which sends its hostname"
            )
        full = ls + rel_url
        return Source("ls", rel_url, display, fetch_url=full, cache_key=_normalise_http_url(full),
                      note=note)

    def _resolve_local_files(self, rel: str, display: str) -> Source:
        values = parse_qs(urlsplit(rel).query, keep_blank_values=True).get("d")
        if not values or not values[0]:
            raise ImageError(f"Label Studio local-files URL {display} has no ?d=<path> parameter")
        if not self.doc_root:
            return self._ls_source(rel, display, note=(
                "Alternatively set LOCAL_FILES_DOCUMENT_ROOT in the backend to the directory "
                "Label Studio serves local files from, to read them directly."))
        path = self._safe_join(values[0], display)
        real = self._resolved_inside(path)
        if real is not None and _is_regular_file(real):
            return Source("local", rel, display, path=real)
        if self.access.url:
            logger.warning(
                "%s is not under LOCAL_FILES_DOCUMENT_ROOT=%s (looked for %s); downloading it from "
                "Label Studio instead. Mount the same directory Label Studio uses to avoid this.",
                display, self.doc_root, path)
            return self._ls_source(rel, display)
        raise ImageError(
            f"{display}: file {path} not found under LOCAL_FILES_DOCUMENT_ROOT={self.doc_root}. "
            "The backend must see the same files as Label Studio: mount the directory Label Studio "
            "uses (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) at LOCAL_FILES_DOCUMENT_ROOT, or unset "
            "it and set LABEL_STUDIO_URL so the file is downloaded from Label Studio"
        )

    def _inside_root(self, path: str) -> Optional[str]:
        """``path`` joined to the document root and normalised; None when it escapes the root."""
        root = self.doc_root
        full = os.path.normpath(os.path.join(root, path))
        return full if _within(full, root) else None

    def _resolved_inside(self, full: str) -> Optional[str]:
        """``full`` (a path lexically inside the document root) with every symbolic link
        resolved; None when that leaves the root (``etclink -> /etc``, then ``etclink/shadow``).
        Links that stay inside the root are followed."""
        try:
            real = os.path.realpath(full)
            root = os.path.realpath(self.doc_root)
        except (OSError, ValueError):
            return None
        return real if _within(real, root) else None

    def _safe_join(self, rel: str, display: str) -> str:
        if "\x00" in rel:
            raise ImageError(f"{display}: the local-files path contains a NUL byte")
        # Like Label Studio: normalise, then make it relative to the document root.
        full = self._inside_root(posixpath.normpath(rel.replace(os.sep, "/")).lstrip("/"))
        if full is None:
            raise ImageError(
                f"{display}: refused: the path escapes LOCAL_FILES_DOCUMENT_ROOT={self.doc_root}. "
                "Local-files paths must lie inside the document root"
            )
        return full

    def _local_source(self, url: str, display: str, path: str) -> Source:
        """A plain path or file:// URL: inside the document root only (relative paths are
        relative to it); anything else gets the one "not available" message."""
        if "\x00" in path:
            raise messages.unavailable(display)
        if self._local_anywhere:
            return Source("local", url, display, path=os.path.abspath(os.path.expanduser(path)))
        full = self._inside_root(path) if self.doc_root else None
        real = self._resolved_inside(full) if full is not None else None
        if real is None:
            logger.info("Image %s: %s is not inside LOCAL_FILES_DOCUMENT_ROOT", display,
                        full or path)
            raise messages.unavailable(display)
        return Source("local", url, display, path=real)

    def _resolve_cloud(self, uri: str, display: str, task_id: Optional[int]) -> Source:
        ls = self.access.url
        if task_id is None:
            raise ImageError(
                f"{display} is a cloud-storage URI: Label Studio has to presign it, which needs the "
                "task id, and none was given"
            )
        if not ls:
            raise ImageError(
                f"{display} is a cloud-storage URI that Label Studio has to presign, but the Label "
                "Studio address is unknown: set LABEL_STUDIO_URL in the backend's environment"
            )
        try:
            task = int(task_id)
        except (TypeError, ValueError):
            raise ImageError(f"{display}: invalid task id {task_id!r}") from None
        encoded = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        fetch = f"{ls}/tasks/{task}/presign/?fileuri={encoded}"
        return Source("cloud", uri, display, fetch_url=fetch, cache_key=uri,
                      note=f"presigned by Label Studio for task {task}")

    # ---- reading what is not downloaded ----------------------------------------------------

    def local_error(self, src: Source) -> ImageError:
        """One message for every local file that cannot be read (missing, not a regular file,
        no permission, ...): it must not tell a stranger what exists on the backend's disk."""
        logger.info("Image %s: %s is not a readable regular file", src.display, src.path)
        return messages.unavailable(src.display)

    def _opened_inside(self, src: Source, opened: os.stat_result) -> bool:
        """Whether the file opened for ``src`` is the one its path leads to now, inside the
        document root: a file or directory swapped for a link after ``src`` was resolved is not
        read (the path was resolved then; the descriptor is checked, not the name)."""
        if self._local_anywhere or not self.doc_root:
            return self._local_anywhere
        real = self._resolved_inside(src.path)
        try:
            return real is not None and os.path.samestat(os.stat(real), opened)
        except (OSError, ValueError):
            return False

    def read_local(self, src: Source, reservation: Optional[Reservation] = None) -> bytes:
        """A regular file's bytes, at most ``max_bytes``, read from the one descriptor that was
        checked: opened once (non-blocking, so that a FIFO cannot block the request; not
        through a link, its path being resolved already), then it must be a regular file (never
        a device, FIFO or socket) and still the file its path leads to inside the document
        root."""
        limit = src.media.max_bytes or self.max_bytes
        flags = _OPEN_FLAGS | (0 if self._local_anywhere else getattr(os, "O_NOFOLLOW", 0))
        try:
            fd = os.open(src.path, flags)
        except (OSError, ValueError):
            raise self.local_error(src) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not self._opened_inside(src, st):
                raise self.local_error(src)
            if st.st_size > limit:
                raise messages.too_big(src.display, limit, download=False, media=src.media)
            if reservation is not None:
                reservation.grow(st.st_size, f"{src.media.noun} {src.display}")
            with os.fdopen(fd, "rb") as fh:
                fd = -1
                data = fh.read(limit + 1)
        except OSError:
            raise self.local_error(src) from None
        finally:
            if fd >= 0:
                os.close(fd)
        if len(data) > limit:
            raise messages.too_big(src.display, limit, download=False, media=src.media)
        logger.debug("Image %s: read %d bytes from %s", src.display, len(data), src.path)
        return data

    @staticmethod
    def read_data_url(src: Source) -> bytes:
        head, sep, payload = src.url.partition(",")
        if not sep:
            raise ImageError(f"{src.display}: malformed data: URL (no comma)")
        try:
            if head.lower().endswith(";base64"):
                return base64.b64decode(payload, validate=False)
            return unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageError(f"{src.display}: malformed base64 in data: URL") from None


__all__ = ["CLOUD_SCHEMES", "IMAGE", "LS_RELATIVE_PREFIXES", "Media", "Source", "Sources", "UnknownLabelStudio",
           "normalise_base_url", "origin"]
