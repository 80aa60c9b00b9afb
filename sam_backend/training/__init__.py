"""Learning from the labels: the training set built from a project's annotations
(:mod:`.dataset`), the held-out split by task (:mod:`.split`), the trainers behind one interface
(:mod:`.base`; :mod:`.rf_detr`, :mod:`.grounding_dino`; :mod:`.augment`), the COCO mAP that
decides what is served (:mod:`.evaluate`), one run start to finish (:mod:`.runner`), the
versions on disk and their reports (:mod:`.versions`, :mod:`.report`), where runs happen
(:mod:`.jobs`: a background process or an RQ ``train`` queue) and how a promoted version answers
a project's auto-annotations (:mod:`.serving`).

The layer sits above ``export`` (whose object grouping it reuses) and below ``server``; it never
runs inside a request."""
