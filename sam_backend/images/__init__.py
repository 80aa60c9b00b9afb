"""Task image -> ``HxWx3 uint8`` RGB array: the sources a task may name (http(s), Label Studio
uploads and storages, local files, data URIs), the network policy for fetching them, decoding,
and the on-disk byte cache.

A new image source goes here; nothing above this folder knows where bytes came from.
"""
