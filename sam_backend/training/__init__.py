"""Learning from the labels (pure functions, no I/O): the training set built from a project's
annotations (:mod:`.dataset`), the held-out split by task (:mod:`.split`) and the COCO mAP of a
model's predictions on the held-out tasks (:mod:`.evaluate`). Trainers, triggers and versions
come later (issue 22); they consume these.

The layer sits above ``export`` (whose object grouping it reuses) and below ``server``."""
