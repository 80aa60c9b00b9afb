"""Reading a Label Studio JSON export, or a project through Label Studio's API, and resolving
its images.

The export must be Label Studio's "JSON" format: a list of tasks with ``data`` and
``annotations[].result[]`` (:func:`load_export`). A :class:`ProjectSource` (``--project ID``)
reads the same tasks from Label Studio's API instead, through the one client
:class:`~sam_backend.labelstudio.api.LabelStudioAPI` (annotations included, data as stored), with
Label Studio's address and token taken as ``sam-backend annotate`` takes them (``--url`` /
``--token`` over ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``): what follows is the same for
both, so a project and its JSON export give the same objects (:func:`open_source`). Every annotation that is not cancelled
(``was_cancelled``) is used (:func:`used_annotations`); predictions and drafts are ignored. A
task's image URL is ``data["image"]``, else the key named by the regions' ``to_name``, else the
task's only string value (:func:`task_image_url`).

Images are fetched through :class:`sam_backend.images.loader.ImageLoader` (``LABEL_STUDIO_URL`` +
``LABEL_STUDIO_API_KEY`` for uploads, local files, presigned cloud URLs, http(s)); with
``--upload_dir``, ``/data/upload/<project>/<file>`` is first looked up as
``<upload_dir>/<project>/<file>`` (:func:`image_fetcher`). The bytes are kept as fetched, never
re-encoded; their header gives the size (EXIF orientation applied, :func:`header_size`).
``images/`` file names are the URL's base name (the Label Studio upload name, UUID prefix
included); a name already used by another task gets the task id as a prefix (:func:`unique_name`).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

from sam_backend.errors import ImageError
from sam_backend.export.geometry import RegionError
from sam_backend.export.report import ExportError

logger = logging.getLogger(__name__)

# (url, task id) -> the image file's bytes; raises ImageError
ImageFetcher = Callable[[str, Optional[int]], bytes]


@dataclass(frozen=True)
class ProjectSource:
    """A Label Studio project read through its API (``--project ID``). ``url`` / ``token``:
    Label Studio's address and token (None: ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``)."""

    project_id: int
    url: Optional[str] = None
    token: Optional[str] = None

    def __str__(self) -> str:
        return f"Label Studio project {self.project_id}"


#: where an export's tasks come from: a JSON export file's path, or a project
TaskSource = Union[str, "os.PathLike[str]", ProjectSource]


def _own_image_loader(url: Optional[str] = None, token: Optional[str] = None):
    """An ImageLoader configured from the environment (the backend's Settings: LABEL_STUDIO_URL,
    LABEL_STUDIO_API_KEY, ...; ``url`` / ``token`` first). An operator's own tool: the export's
    local paths are read wherever they are."""
    from sam_backend import assembly
    from sam_backend.settings import Settings

    options = {name: value for name, value in (("label_studio_url", url),
                                               ("label_studio_api_key", token)) if value}
    return assembly.image_loader(Settings.load(options), local_paths_anywhere=True)


def project_tasks(image_loader, project_id: int) -> list:
    """Every task of the project with its annotations, as its JSON export holds them."""
    from sam_backend.labelstudio.api import LabelStudioAPI

    api = LabelStudioAPI(image_loader)
    try:
        return api.tasks(project_id, annotations=True)
    finally:
        api.close()


@contextlib.contextmanager
def open_source(source: TaskSource, image_loader=None, images: bool = True
                ) -> Iterator[Tuple[list, Any]]:
    """``(tasks, loader)``: the tasks of ``source`` (an export file or a :class:`ProjectSource`)
    and the ImageLoader their images are fetched with: ``image_loader``, else one configured from
    the environment (and the project's ``url`` / ``token``), closed on exit. ``loader`` is None
    when ``images`` is false and ``source`` is a file (nothing to fetch, nothing to configure)."""
    own = None
    try:
        loader = image_loader
        if isinstance(source, ProjectSource):
            if loader is None:
                loader = own = _own_image_loader(source.url, source.token)
            tasks = project_tasks(loader, source.project_id)
        else:
            tasks = load_export(os.fspath(source))
            if images and loader is None:
                loader = own = _own_image_loader()
        yield tasks, loader
    finally:
        if own is not None:
            own.close()


def load_export(json_file_path: str) -> list:
    """The tasks of a Label Studio JSON export file."""
    try:
        with open(json_file_path, "rb") as fh:
            tasks = json.load(fh)
    except FileNotFoundError:
        raise ExportError(f"export file {json_file_path} not found") from None
    except OSError as exc:
        raise ExportError(
            f"cannot read export file {json_file_path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"export file {json_file_path} is not valid JSON ({exc}); export the "
                          "project from Label Studio in the 'JSON' format") from None
    if isinstance(tasks, dict) and "data" in tasks:
        tasks = [tasks]  # a single task
    if not isinstance(tasks, list):
        raise ExportError(f"export file {json_file_path} does not hold a list of tasks; export the "
                          "project from Label Studio in the 'JSON' format")
    return tasks


def used_annotations(task: dict) -> List[dict]:
    """The task's annotations that are not cancelled (``completions`` of very old exports)."""
    anns = task.get("annotations")
    if anns is None:
        anns = task.get("completions")
    if not isinstance(anns, list):
        return []
    return [a for a in anns if isinstance(a, dict) and not a.get("was_cancelled")]


def task_image_url(task: dict, results: Iterable[dict]) -> str:
    """The task's image URL (see the module docstring); raises RegionError naming what is
    wrong."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise RegionError("task has no 'data'")
    keys = ["image"] + [r.get("to_name") for r in results if isinstance(r.get("to_name"), str)]
    for key in dict.fromkeys(keys):
        if key in data:
            url = data[key]
            break
    else:
        strings = [v for v in data.values() if isinstance(v, str) and v.strip()]
        if len(strings) != 1:
            raise RegionError(
                f"cannot tell which of the task's data fields is the image (fields: "
                f"{', '.join(map(str, data)) or 'none'}); name it 'image'")
        url = strings[0]
    if isinstance(url, list):
        raise RegionError("multi-image tasks (a list of images) are not supported")
    if not isinstance(url, str) or not url.strip():
        raise RegionError(f"the task's image URL is empty or not a string: {url!r}")
    return url.strip()


def _base_name(url: str) -> str:
    """The image's file name from its URL (``?d=`` of local files, else the path's last part)."""
    if url[:5].lower() == "data:":
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    path = parts.path
    if "/data/local-files" in path:
        d = parse_qs(parts.query).get("d")
        if d:
            path = d[0]
    elif parts.scheme.lower() in ("s3", "gs", "azure-blob"):
        path = parts.path or parts.netloc
    name = posixpath.basename(unquote(path).replace("\\", "/"))
    name = "".join(ch for ch in name if ch >= " " and ch not in '/\\:*?"<>|').strip()
    return "" if name in (".", "..") else name


_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "DIB": ".bmp"}


def unique_name(url: str, task_id: Any, position: int, fmt: str, used: set) -> str:
    """The image's file name under ``images/``, not yet in ``used`` (case-folded; updated).
    ``fmt``: Pillow's format name, for an extension when the URL has none."""
    tag = str(task_id) if task_id is not None else f"pos{position}"
    name = _base_name(url) or f"task_{tag}"
    if not os.path.splitext(name)[1] and fmt:
        name += _EXTENSIONS.get(fmt, "." + fmt.lower())
    candidate = name
    n = 1
    # compared case-insensitively: the images may land on a case-insensitive file system
    while candidate.casefold() in used:
        candidate = f"{tag}_{name}" if n == 1 else f"{tag}_{n}_{name}"
        n += 1
    used.add(candidate.casefold())
    return candidate


def header_size(data: bytes) -> Optional[Tuple[str, int, int]]:
    """(format, width, height) from the image header, EXIF orientation applied; None if Pillow
    cannot read it; width = height = -1 for an image too large for Pillow to open."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except Exception:  # noqa: BLE001 - a broken EXIF block: orientation unknown
                orientation = None
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            return img.format or "", width, height
    except Image.DecompressionBombError:
        return "", -1, -1
    except Exception:  # noqa: BLE001 - anything Pillow cannot open
        return None


def _upload_dir_path(url: str, upload_dir: str) -> Optional[str]:
    """``<upload_dir>/<project>/<file>`` for a ``/data/upload/<project>/<file>`` URL, if that file
    exists (and lies inside ``upload_dir``); else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    path = parts.path
    if parts.scheme.lower() in ("http", "https"):
        idx = path.find("/data/upload/")
        if idx < 0:
            return None
        path = path[idx:]
    elif parts.scheme:
        return None
    if path.startswith(("upload/", "/upload/")):  # old Label Studio exports
        path = "/data/" + path.lstrip("/")
    prefix = "/data/upload/"
    if not path.startswith(prefix):
        return None
    root = os.path.abspath(os.path.expanduser(upload_dir))
    for rel in dict.fromkeys((path[len(prefix):], unquote(path[len(prefix):]))):
        rel = posixpath.normpath(rel).lstrip("/")
        full = os.path.normpath(os.path.join(root, rel))
        if not full.startswith(root.rstrip(os.sep) + os.sep):
            continue
        if os.path.isfile(full):
            return full
    return None


def _is_upload_url(url: str) -> bool:
    return "/data/upload/" in url or url.startswith(("upload/", "/upload/"))


def check_upload_dir(upload_dir: Optional[str]) -> None:
    """Raises ExportError when ``--upload_dir`` is given but is not a directory."""
    if upload_dir and not os.path.isdir(os.path.expanduser(upload_dir)):
        raise ExportError(f"--upload_dir {upload_dir} is not a directory (Label Studio's media "
                          "upload directory, e.g. ~/.local/share/label-studio/media/upload)")


def make_image_fetcher(image_loader, upload_dir: Optional[str] = None) -> ImageFetcher:
    """An :data:`ImageFetcher`: ``upload_dir`` first for Label Studio uploads, then
    ``image_loader.fetch_bytes`` (an :class:`~sam_backend.images.loader.ImageLoader`)."""

    def fetch(url: str, task_id: Optional[int]) -> bytes:
        local = _upload_dir_path(url, upload_dir) if upload_dir else None
        if local is not None:
            try:
                with open(local, "rb") as fh:
                    data = fh.read()
            except OSError as exc:
                raise ImageError(f"cannot read {local}: {exc.strerror or exc}") from None
            logger.debug("image %s: read from the upload directory (%s)", url, local)
            return data
        try:
            return image_loader.fetch_bytes(url, task_id)
        except ImageError as exc:
            if upload_dir and _is_upload_url(url):
                raise ImageError(
                    f"{exc} (not found under --upload_dir {upload_dir} either)") from None
            raise

    return fetch


@contextlib.contextmanager
def image_fetcher(image_loader=None, upload_dir: Optional[str] = None) -> Iterator[ImageFetcher]:
    """:func:`make_image_fetcher` over ``image_loader``; None: an ImageLoader configured from the
    environment (the backend's Settings: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, ...), closed on
    exit (an operator's own tool: the export's local paths are read wherever they are)."""
    if image_loader is not None:
        yield make_image_fetcher(image_loader, upload_dir)
        return
    own = _own_image_loader()
    try:
        yield make_image_fetcher(own, upload_dir)
    finally:
        own.close()


__all__ = ["ImageFetcher", "ProjectSource", "TaskSource", "check_upload_dir", "header_size",
           "image_fetcher", "load_export", "make_image_fetcher", "open_source", "project_tasks",
           "task_image_url", "unique_name", "used_annotations"]
