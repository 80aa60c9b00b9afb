"""Segment Anything models: which variants exist, where their checkpoints come from, and one
runtime per engine behind the same embed/decode interface (:mod:`.base`).

A new SAM family is a ``*_runtime.py`` module here plus its entries in :mod:`.registry`; nothing
outside this folder asks which family runs.
"""
