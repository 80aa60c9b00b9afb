"""The Label Studio layer: everything that knows Label Studio's shapes. The labeling config
(which controls exist, where a task's image is), prompts from /predict's context, the
:class:`~.service.PredictionService` that answers /setup and /predict by joining image, embedding
and mask, and the regions (brush RLE, polygons, boxes) sent back; :mod:`.api`, the one client of
Label Studio's REST API (a project, its tasks paged once, predictions) the commands use.

Below it: the engine layer (:class:`~sam_backend.embeddings.engine.Segmenter`) and the model layer
(:class:`~sam_backend.models.base.SegmentationModel`); above it: the HTTP layer (server/).
A new output format for Label Studio goes in :mod:`.regions` / :mod:`.rle`.
"""
