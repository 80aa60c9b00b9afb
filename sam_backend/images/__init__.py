"""Task image -> ``HxWx3 uint8`` RGB array, one module per concern:

* :mod:`.sources` -- what a task's URL means (Label Studio uploads and storages, local files,
  ``data:`` URIs, http(s)) and the image's identity; a new image source goes here;
* :mod:`.credentials` -- Label Studio's address and tokens, and where the API key may go;
* :mod:`.fetch` -- HTTP downloads: session, redirects, deadline, byte limits, retries;
* :mod:`.netpolicy` -- where downloads may connect (no metadata addresses, host allowlist);
* :mod:`.disk_cache` -- downloaded bytes kept across restarts (a new cache tier goes here);
* :mod:`.decode` -- bytes -> pixels (formats, EXIF, 16-bit/float, the header-size check);
* :mod:`.messages` -- what users read when a download fails;
* :mod:`.config` -- :class:`~.config.ImageAccessSettings`;
* :mod:`.loader` -- :class:`~.loader.ImageLoader`, which joins them.

A task's video comes from the same sources through the same code:
:meth:`~.loader.ImageLoader.fetch_media` with a :class:`~.sources.Media` (its noun for messages,
its byte limit and download deadline) returns the file's bytes (``sam_backend.video.clip``
decodes them).

Nothing above this folder knows where bytes came from.
"""
