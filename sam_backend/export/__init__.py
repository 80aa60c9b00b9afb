"""Offline exporters from a Label Studio JSON export to training data, run as commands, never by
the server (nothing on the request path imports this folder).

One way through, each step in its own module:

    source      the tasks (an export file, or --project through Label Studio's API), each
                task's image URL, the image bytes and file names
    geometry    one region -> COCO segmentation/area/bbox
    objects     the regions of one annotation grouped into objects (one object, one annotation)
    convert     tasks -> one COCO dict + report (shared by every format), the train/val split
    report      ExportError, the problems by task id, the summary
    coco, yolo  the output formats; mmdet_config a training config for the COCO dataset
    cli         the export-coco / export-yolo commands and their shared options
    preview     `sam-backend preview`: a COCO or YOLO export, or the tasks, drawn as images

A new output format is a module that turns :func:`.convert.convert_export`'s COCO dict into its
files, plus its command in :mod:`.cli`.
"""
