"""Label by concept: label names (or typed phrases) become text prompts and every instance comes
back as regions. :mod:`.base` holds the engine interface and the annotator; one module per engine
(SAM 3, Grounding DINO + the click model). ``sam-backend annotate`` (a whole project) is
:mod:`sam_backend.commands.annotate`.

A new concept engine is a module here plus its name in
:func:`sam_backend.assembly.create_concept_engine`.
"""
