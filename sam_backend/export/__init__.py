"""Offline exporters from Label Studio annotations to training data: objects from regions
(:mod:`.objects`), COCO with RLE, YOLO segmentation and MMDetection configs.

The server never imports this folder; a new training format is a module here with its command.
"""
