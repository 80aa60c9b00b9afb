"""Video: track every object an annotator boxed through a clip.

    video task -> clip (source, limits, frames streamed) -> tracker session -> tracks
               -> Label Studio ``videorectangle`` regions

:mod:`.base` holds the contract the pieces share (clip, prompts, tracks, tracker); the frame
reader, the trackers (one per model family) and the service that answers Label Studio build on it.
"""
