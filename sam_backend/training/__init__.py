"""Learning from the labels (pure functions, no I/O): the training set built from a project's
annotations (:mod:`.dataset`), the held-out split by task (:mod:`.split`) and the COCO mAP of a
model's predictions on the held-out tasks (:mod:`.evaluate`); the trainers behind one interface
(:mod:`.base`); a run start to finish (:mod:`.runner`), its report (:mod:`.report`), the versions
on disk (:mod:`.versions`) and where runs happen (:mod:`.jobs`: a background process, or an RQ
worker for a team).

The layer sits above ``export`` (whose object grouping it reuses) and below ``server``."""
