"""Errors a user can act on. Every message names the thing that is wrong and what to do."""


class SamBackendError(Exception):
    """Base class: the message is safe to show to a Label Studio user (no tokens, no traces)."""


class ConfigError(SamBackendError):
    """A start-up option is wrong (unknown model, bad device, ...)."""


class CheckpointError(SamBackendError):
    """A checkpoint file is missing, unreadable or does not fit the chosen architecture."""


class RequestError(SamBackendError):
    """A /predict request cannot be answered as sent (bad JSON, bad coordinates, ...)."""


class ImageError(SamBackendError):
    """The task's image cannot be fetched or decoded."""


class VideoError(ImageError):
    """The task's video cannot be fetched or decoded, or is past a video limit (400, as an
    image)."""


class BusyError(SamBackendError):
    """The backend is at one of its concurrency or memory limits right now: retry shortly (503)."""
