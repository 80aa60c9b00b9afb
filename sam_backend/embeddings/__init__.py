"""Where an image's embedding comes from: the in-process LRU (:mod:`.memory`), the shared Redis
tier (:mod:`.store`), or the encoder, decided by the :class:`~.engine.Segmenter`; and the RQ
workers that fill the shared tier ahead of the annotators (:mod:`.precompute`).

A new cache tier goes here, behind the store's interface; the engine never says which tier answered.
"""
