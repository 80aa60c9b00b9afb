"""A task's video file -> :class:`~sam_backend.video.base.Clip`, read with OpenCV's
``cv2.VideoCapture`` (FFmpeg), frame by frame, never all at once.

* **Where the bytes come from** is the image layer's business
  (:meth:`~sam_backend.images.loader.ImageLoader.fetch_video_bytes`: Label Studio uploads,
  presigned cloud URLs, local files under the document root, http(s)); here they are written to a
  temporary file (OpenCV reads files, not memory) that lives as long as the clip.
* **Identity**: ``key`` is ``"video:sha256:<hex>"`` of the file's bytes
  (:func:`~sam_backend.common.files.sha256_of`): the same clip under two URLs shares its cached
  features; a re-uploaded clip with other bytes does not.
* **Frame count**: ``CAP_PROP_FRAME_COUNT`` is what the container claims (for WebM/Matroska,
  OpenCV estimates it from the duration and the frame rate; a cut or damaged file claims frames
  it does not have), so it is never trusted: opening a clip walks it once with ``grab()`` (demux
  and decode, no colour conversion) and counts the frames that really decode. That count is
  ``info.frames``, the numbering Label Studio's frame numbers are checked against. The claim is
  still used to refuse a clip early (before the walk) when it alone is past a limit.
* **Seeking**: ``frames(start, stop)`` opens its own reader and steps forward with ``grab()`` to
  ``start`` (exact for every codec and variable frame rates, at the cost of decoding the frames
  before ``start``; OpenCV's ``CAP_PROP_POS_FRAMES`` seek lands on key frames for some files).
  Each call has its own reader, so a clip can be read from several threads.
* **Limits** (:class:`VideoLimits`, options ``max_video_bytes``, ``max_video_seconds``,
  ``max_video_frame_pixels``, ``max_video_frames``): the byte size before anything is written,
  the frame size from the header before any frame is decoded, the claimed length before the walk,
  and the walk stops as soon as the clip is past the frame or duration limit.

Errors about a particular clip (corrupt, unsupported, empty, past a limit) are
:class:`~sam_backend.errors.VideoError` (an ``ImageError``: HTTP 400 with the message), naming the
video and what to do.
"""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Iterator, Optional, Tuple

import cv2
import numpy as np

from sam_backend.common.files import sha256_of
from sam_backend.common.limits import Reservation
from sam_backend.errors import ConfigError, VideoError
from sam_backend.images.decode import looks_like_html, sniff_image_format
from sam_backend.images.sources import Media
from sam_backend.video.base import Clip, ClipInfo

if TYPE_CHECKING:
    from sam_backend.images.loader import ImageLoader
    from sam_backend.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MAX_VIDEO_BYTES = 1024 ** 3
DEFAULT_MAX_VIDEO_SECONDS = 1800.0
DEFAULT_MAX_VIDEO_FRAME_PIXELS = 3840 * 2160
DEFAULT_MAX_VIDEO_FRAMES = 54000
DEFAULT_VIDEO_TIMEOUT = 300.0

_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}")
SUPPORTED = "MP4/MOV, WebM/MKV, AVI, MPEG-TS/PS, FLV, Ogg or ASF/WMV with a codec FFmpeg decodes"


@dataclass(frozen=True)
class VideoLimits:
    """Bounds of one clip; ``from_settings`` reads them from the options named in comments."""

    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # max_video_bytes
    max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS  # max_video_seconds
    max_frame_pixels: int = DEFAULT_MAX_VIDEO_FRAME_PIXELS  # max_video_frame_pixels
    max_frames: int = DEFAULT_MAX_VIDEO_FRAMES  # max_video_frames
    timeout: float = DEFAULT_VIDEO_TIMEOUT  # video_timeout: seconds for a whole download

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"video limit {f.name}={value!r} must be a positive number")

    @classmethod
    def from_settings(cls, settings: "Settings") -> "VideoLimits":
        return cls(max_bytes=settings.max_video_bytes, max_seconds=settings.max_video_seconds,
                   max_frame_pixels=settings.max_video_frame_pixels,
                   max_frames=settings.max_video_frames, timeout=settings.video_timeout)


# (format, offset, magic): first match wins
_SIGNATURES: Tuple[Tuple[str, int, bytes], ...] = (
    ("mp4", 4, b"ftyp"),
    ("webm", 0, b"\x1a\x45\xdf\xa3"),  # EBML: WebM and Matroska
    ("flv", 0, b"FLV\x01"),
    ("ogg", 0, b"OggS"),
    ("asf", 0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),
    ("mpeg", 0, b"\x00\x00\x01\xba"),
)


def sniff_video_format(data: bytes) -> Optional[str]:
    """The container of a video file from its first bytes (``mp4`` for MP4/MOV/3GP, ``webm`` for
    WebM/Matroska, ``avi``, ``mpegts``, ``mpeg``, ``flv``, ``ogg``, ``asf``); None when it is
    none of them. Says nothing about whether its codec decodes."""
    head = bytes(data[:16])
    for name, offset, magic in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if len(data) >= 377 and data[0] == 0x47 and data[188] == 0x47 and data[376] == 0x47:
        return "mpegts"
    if head[4:8] in (b"moov", b"mdat", b"free", b"wide"):  # old QuickTime without ftyp
        return "mp4"
    return None


def _check_frame_count(count: int, fps: float, limits: VideoLimits, name: str,
                       claimed: bool) -> None:
    how = "its header claims" if claimed else "it has"
    if count > limits.max_frames:
        raise VideoError(f"{name}: {how} {count:,} frames, more than the limit of "
                         f"{limits.max_frames:,} (max_video_frames): cut the video into shorter "
                         f"clips, or raise max_video_frames")
    seconds = count / fps
    if seconds > limits.max_seconds:
        raise VideoError(f"{name}: {how} {seconds:.1f} s of video, longer than the limit of "
                         f"{limits.max_seconds:g} s (max_video_seconds): cut the video into "
                         f"shorter clips, or raise max_video_seconds")


class VideoFileClip(Clip):
    """A clip read from a video file (module docstring). ``name``: how messages call it
    (e.g. ``video /data/upload/1/x.webm``). ``owns_file``: delete the file on :meth:`close`."""

    def __init__(self, path: str, *, limits: VideoLimits = VideoLimits(), name: str = "video",
                 key: Optional[str] = None, owns_file: bool = False):
        self.path = str(path)
        self.name = name
        self.limits = limits
        self._owns_file = owns_file
        try:
            self.key = key or "video:sha256:" + sha256_of(self.path)
            self.info = self._probe()
        except BaseException:
            self.close()
            raise
        logger.debug("%s: %d frames of %dx%d at %.3f fps", name, self.info.frames,
                     self.info.width, self.info.height, self.info.fps)

    # ---- opening --------------------------------------------------------------------------

    def _capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise VideoError(f"{self.name} cannot be decoded: it is corrupt or not a supported "
                             f"video ({SUPPORTED})")
        return cap

    def _probe(self) -> ClipInfo:
        limits = self.limits
        cap = self._capture()
        try:
            width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            fps = float(cap.get(cv2.CAP_PROP_FPS))
            claimed = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if width * height > limits.max_frame_pixels:
                raise VideoError(
                    f"{self.name}: its frames are {width}x{height} = {width * height:,} pixels, "
                    f"more than the limit of {limits.max_frame_pixels:,} (max_video_frame_pixels)"
                    f": downscale the video, or raise max_video_frame_pixels")
            if not (math.isfinite(fps) and fps > 0):
                raise VideoError(f"{self.name} has no frame rate in its header: it is corrupt or "
                                 f"not a supported video ({SUPPORTED}); re-encode it")
            if math.isfinite(claimed) and claimed > 0:
                _check_frame_count(int(claimed), fps, limits, self.name, claimed=True)
            ok, first = cap.read()
            if not ok or first is None:
                raise VideoError(f"{self.name} has no frame that decodes: it is empty, corrupt or "
                                 f"its codec is not supported ({SUPPORTED})")
            if first.ndim != 3 or first.shape[2] != 3:
                raise VideoError(f"{self.name}: frames decode as {first.shape}, not colour "
                                 "images; re-encode it")
            height, width = first.shape[:2]  # what really decodes, not the header's word
            if width * height > limits.max_frame_pixels:
                raise VideoError(f"{self.name}: its frames are {width}x{height}, more than the "
                                 f"limit of {limits.max_frame_pixels:,} pixels "
                                 f"(max_video_frame_pixels)")
            count = 1
            while cap.grab():
                count += 1
                if count > limits.max_frames or count / fps > limits.max_seconds:
                    _check_frame_count(count, fps, limits, self.name, claimed=False)
        finally:
            cap.release()
        if math.isfinite(claimed) and claimed > 0 and int(claimed) != count:
            logger.info("%s: the header claims %d frames, %d decode; using %d", self.name,
                        int(claimed), count, count)
        return ClipInfo(frames=count, fps=fps, width=width, height=height)

    # ---- reading --------------------------------------------------------------------------

    def frames(self, start: int = 0, stop: Optional[int] = None
               ) -> Iterator[Tuple[int, np.ndarray]]:
        """``(index, frame)`` for ``start <= index < stop`` (default: to the end); ``frame`` is
        HxWx3 uint8 RGB. The frames before ``start`` are stepped over with ``grab()``."""
        total = self.info.frames
        stop = total if stop is None else min(int(stop), total)
        start = max(0, int(start))
        if start >= stop:
            return
        cap = self._capture()
        try:
            for index in range(start):
                if not cap.grab():
                    raise VideoError(f"{self.name}: frame {index} no longer decodes (did the "
                                     "file change?)")
            for index in range(start, stop):
                ok, frame = cap.read()
                if not ok or frame is None:
                    raise VideoError(f"{self.name}: frame {index} no longer decodes (did the "
                                     "file change?)")
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    def frame(self, index: int) -> np.ndarray:
        if not 0 <= index < self.info.frames:
            raise IndexError(f"frame {index} is outside the clip's {self.info.frames} frames")
        return super().frame(index)

    def close(self) -> None:
        if self._owns_file:
            self._owns_file = False
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "VideoFileClip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a clip dropped without close() leaves no temporary file
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_clip(path: str, *, limits: VideoLimits = VideoLimits(),
              name: Optional[str] = None) -> VideoFileClip:
    """A clip of the video file at ``path`` (read in place; its size checked first)."""
    name = name or f"video {os.path.basename(path)}"
    try:
        size = os.path.getsize(path)
    except OSError:
        raise VideoError(f"{name} cannot be read") from None
    _check_bytes(size, limits, name)
    return VideoFileClip(path, limits=limits, name=name)


def _check_bytes(size: int, limits: VideoLimits, name: str) -> None:
    if size == 0:
        raise VideoError(f"{name} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise VideoError(f"{name} is {size:,} bytes, larger than the limit of "
                         f"{limits.max_bytes:,} (max_video_bytes): cut or re-encode it, or "
                         f"raise max_video_bytes")


def clip_from_bytes(data: bytes, *, limits: VideoLimits = VideoLimits(), name: str = "video",
                    directory: Optional[str] = None) -> VideoFileClip:
    """A clip of a video file's ``data`` (as downloaded): size and container checked, written
    to a temporary file in ``directory`` (default: the system's), which :meth:`Clip.close`
    deletes."""
    _check_bytes(len(data), limits, name)
    kind = sniff_video_format(data)
    if kind is None:
        raise VideoError(f"{name} is not a supported video ({len(data):,} bytes that are none of "
                         f"{SUPPORTED})")
    fd, path = tempfile.mkstemp(prefix="sam_backend-clip-", suffix="." + kind, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return VideoFileClip(path, limits=limits, name=name, owns_file=True)


def not_a_video_message(data: bytes, name: str, content_type: Optional[str] = None) -> str:
    """What a user reads when a task's video URL gives something else (``name``: the file)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    shown = f", Content-Type {media}" if _MEDIA_TYPE.fullmatch(media) else ""  # never echo junk
    if looks_like_html(data, content_type):
        return (f"{name} is an HTML page, not a video ({len(data):,} bytes{shown}). When it comes "
                "from Label Studio this is usually its login page: the request was not "
                "authenticated; set LABEL_STUDIO_API_KEY. Otherwise the task's URL points to a "
                "web page rather than to the video file.")
    if sniff_image_format(data):
        return (f"{name} is an image, not a video: use an <Image> tag for it, or point the "
                "task's <Video> value at a video file")
    return f"{name} is not a supported video ({len(data):,} bytes{shown}): use {SUPPORTED}"


def fetch_clip(loader: "ImageLoader", url: str, task_id: Optional[int] = None, *,
               limits: VideoLimits = VideoLimits(), reservation: Optional[Reservation] = None,
               directory: Optional[str] = None) -> VideoFileClip:
    """The clip behind a task's video ``url``: its bytes from the image layer's sources (Label
    Studio uploads with its token, presigned cloud URIs, local files under the document root,
    http(s), the disk cache), at most ``limits.max_bytes``, downloaded within ``limits.timeout``
    seconds, then :func:`clip_from_bytes`."""
    media = Media("video", limits.max_bytes, "max_video_bytes, SAM_BACKEND_MAX_VIDEO_BYTES",
                  limits.timeout, "video_timeout, SAM_BACKEND_VIDEO_TIMEOUT")
    data = loader.fetch_media(url, task_id, media, lambda b: sniff_video_format(b) is not None,
                              not_a_video_message, reservation)
    shown = loader.sources.resolve(url, task_id).display
    return clip_from_bytes(data, limits=limits, name=f"video {shown}", directory=directory)


__all__ = ["DEFAULT_VIDEO_TIMEOUT", "DEFAULT_MAX_VIDEO_BYTES", "DEFAULT_MAX_VIDEO_FRAMES", "DEFAULT_MAX_VIDEO_FRAME_PIXELS",
           "DEFAULT_MAX_VIDEO_SECONDS", "VideoFileClip", "VideoLimits", "clip_from_bytes",
           "fetch_clip", "not_a_video_message", "open_clip", "sniff_video_format"]
