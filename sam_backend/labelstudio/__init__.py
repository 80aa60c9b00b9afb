"""Label Studio's side of a request: the labeling config (which controls exist), prompts from
/predict's context, the /predict service that joins image, embedding and mask, and the regions
(brush RLE, polygons, boxes) sent back.

A new output format for Label Studio goes in :mod:`.regions` / :mod:`.rle`.
"""
