"""Segment Anything models: which variants exist, where their checkpoints come from, and one
runtime per engine behind the same embed/decode interface (:mod:`.base`).

- :mod:`.families` (the family table: one row per ``model_name``), :mod:`.registry` (its
  variants by name and file), :mod:`.loading` (strict checkpoint loading);
- :mod:`.checkpoints` (which variant and file a start uses), :mod:`.download` (verified, resumable
  downloads; :mod:`.hub` for model-hub repositories), :mod:`.random_init` (random stand-ins;
  ``sam-backend weights`` is :mod:`sam_backend.commands.weights`);
- :mod:`.runtimes` (``create_model``: the runtime the table chooses, through the family's
  runtime module), one ``*_runtime.py`` per engine, and :mod:`.onnx_export` (making the ONNX
  graphs :mod:`.onnx_runtime` runs).

A new SAM family is a ``*_runtime.py`` module here plus one row in :mod:`.families`; nothing
else asks which family runs.
"""
