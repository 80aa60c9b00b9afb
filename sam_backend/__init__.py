"""sam_backend: an interactive Segment Anything backend for Label Studio."""

__version__ = "0.1.0"
