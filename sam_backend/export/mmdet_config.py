"""A ready MMDetection 3.x training config for an exported COCO dataset.

``sam-backend export-coco --mmdet-config mask-rcnn_r50_fpn`` (or ``rtmdet-ins_s``) writes
``<out_dir>/<name>.py`` next to ``annotations/`` and ``images/``: a self-contained config (no
``_base_``, so it loads with ``mmengine.Config.fromfile`` without MMDetection installed, and trains
with MMDetection's ``tools/train.py``). What is filled in for the dataset:

* ``data_root = '{{ fileDirname }}/'``: mmengine replaces it with the config file's directory,
  so the dataset folder can be moved as a whole;
* ``ann_file`` of each split (``annotations/train.json`` / ``val.json`` with ``--val-fraction``,
  else ``annotations/ann.json`` for both), ``data_prefix=dict(img='images/')``;
* ``metainfo = dict(classes=(...))`` in category-id order (MMDetection maps categories by name);
* ``num_classes`` in every head that has one (Mask R-CNN: the box and the mask head; RTMDet-Ins:
  its head);
* ``LoadAnnotations(with_bbox=True, with_mask=True, poly2mask=True)``: the masks are COCO RLE,
  which MMDetection ignores with ``poly2mask=False`` (the RTMDet-Ins default);
* ``auto_scale_lr`` enabled: the learning rate follows the batch size actually used.

The model, pipeline and schedule are MMDetection's own for the named config
(``mask-rcnn_r50_fpn_1x_coco``, ``rtmdet-ins_s_8xb32-300e_coco``), with ImageNet-pretrained
backbones; set ``load_from`` to a COCO checkpoint of MMDetection's model zoo to fine-tune.
"""
from __future__ import annotations

import logging
import pprint
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from sam_backend.common.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["TEMPLATES", "build_config", "write_config"]


class _Ref:
    """A name written as-is into the config (a reference to a variable defined above it)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _load_annotations() -> dict:
    return dict(type="LoadAnnotations", with_bbox=True, with_mask=True, poly2mask=True)


def _data(train_pipeline: list, test_pipeline: list, train_batch: int, val_ann: str,
          train_ann: str) -> List[Tuple[str, object]]:
    dataset = dict(type=_Ref("dataset_type"), data_root=_Ref("data_root"),
                   metainfo=_Ref("metainfo"), data_prefix=dict(img=_Ref("img_prefix")))
    return [
        ("train_ann_file", train_ann),
        ("val_ann_file", val_ann),
        ("img_prefix", "images/"),
        ("train_pipeline", train_pipeline),
        ("test_pipeline", test_pipeline),
        ("train_dataloader", dict(
            batch_size=train_batch, num_workers=2, persistent_workers=True,
            sampler=dict(type="DefaultSampler", shuffle=True),
            batch_sampler=dict(type="AspectRatioBatchSampler"),
            dataset=dict(dataset, ann_file=_Ref("train_ann_file"),
                         filter_cfg=dict(filter_empty_gt=True, min_size=32),
                         pipeline=_Ref("train_pipeline")))),
        ("val_dataloader", dict(
            batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
            sampler=dict(type="DefaultSampler", shuffle=False),
            dataset=dict(dataset, ann_file=_Ref("val_ann_file"), test_mode=True,
                         pipeline=_Ref("test_pipeline")))),
        ("test_dataloader", _Ref("val_dataloader")),
        ("val_evaluator", dict(type="CocoMetric", ann_file=_Ref("data_root + val_ann_file"),
                               metric=["bbox", "segm"], format_only=False)),
        ("test_evaluator", _Ref("val_evaluator")),
    ]


_RUNTIME = [
    ("default_scope", "mmdet"),
    ("env_cfg", dict(cudnn_benchmark=False,
                     mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl"))),
    ("vis_backends", [dict(type="LocalVisBackend")]),
    ("visualizer", dict(type="DetLocalVisualizer", vis_backends=_Ref("vis_backends"),
                        name="visualizer")),
    ("log_processor", dict(type="LogProcessor", window_size=50, by_epoch=True)),
    ("log_level", "INFO"),
    ("load_from", None),
    ("resume", False),
]


def _hooks(checkpoint: dict) -> dict:
    return dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=50),
                param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=checkpoint,
                sampler_seed=dict(type="DistSamplerSeedHook"),
                visualization=dict(type="DetVisualizationHook"))


def _mask_rcnn_r50_fpn(num_classes: _Ref) -> tuple:
    coder = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0])
    model = dict(
        type="MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True,
                               pad_size_divisor=32),
        backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                      frozen_stages=1, norm_cfg=dict(type="BN", requires_grad=True),
                      norm_eval=True, style="pytorch",
                      init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet50")),
        neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
        rpn_head=dict(
            type="RPNHead", in_channels=256, feat_channels=256,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(coder, target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=7,
                                                   sampling_ratio=0),
                                    out_channels=256, featmap_strides=[4, 8, 16, 32]),
            bbox_head=dict(
                type="Shared2FCBBoxHead", in_channels=256, fc_out_channels=1024,
                roi_feat_size=7, num_classes=num_classes,
                bbox_coder=dict(coder, target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
            mask_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=14,
                                                   sampling_ratio=0),
                                    out_channels=256, featmap_strides=[4, 8, 16, 32]),
            mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=256,
                           conv_out_channels=256, num_classes=num_classes,
                           loss_mask=dict(type="CrossEntropyLoss", use_mask=True,
                                          loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3,
                                   min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5,
                                  neg_pos_ub=-1, add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000,
                              nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5,
                                    min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25,
                                   neg_pos_ub=-1, add_gt_as_proposals=True),
                      mask_size=28, pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)))
    train_pipeline = [
        dict(type="LoadImageFromFile"), _load_annotations(),
        dict(type="Resize", scale=(1333, 800), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5), dict(type="PackDetInputs")]
    test_pipeline = [
        dict(type="LoadImageFromFile"), dict(type="Resize", scale=(1333, 800), keep_ratio=True),
        _load_annotations(),
        dict(type="PackDetInputs",
             meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    schedule = [
        ("max_epochs", 12),
        ("train_cfg", dict(type="EpochBasedTrainLoop", max_epochs=_Ref("max_epochs"),
                           val_interval=1)),
        ("val_cfg", dict(type="ValLoop")),
        ("test_cfg", dict(type="TestLoop")),
        ("param_scheduler", [
            dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
            dict(type="MultiStepLR", begin=0, end=_Ref("max_epochs"), by_epoch=True,
                 milestones=[8, 11], gamma=0.1)]),
        ("optim_wrapper", dict(type="OptimWrapper",
                               optimizer=dict(type="SGD", lr=0.02, momentum=0.9,
                                              weight_decay=0.0001))),
        # the learning rate above is for 16 images per step; scaled to the batch actually used
        ("auto_scale_lr", dict(enable=True, base_batch_size=16)),
        ("default_hooks", _hooks(dict(type="CheckpointHook", interval=1))),
    ]
    return [("model", model)], train_pipeline, test_pipeline, 2, schedule


def _rtmdet_ins_s(num_classes: _Ref) -> tuple:
    norm, act = dict(type="SyncBN"), dict(type="SiLU", inplace=True)
    model = dict(
        type="RTMDet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[103.53, 116.28, 123.675],
                               std=[57.375, 57.12, 58.395], bgr_to_rgb=False,
                               batch_augments=None),
        backbone=dict(type="CSPNeXt", arch="P5", expand_ratio=0.5, deepen_factor=0.33,
                      widen_factor=0.5, channel_attention=True, norm_cfg=norm, act_cfg=act,
                      init_cfg=dict(type="Pretrained", prefix="backbone.",
                                    checkpoint=_Ref("checkpoint"))),
        neck=dict(type="CSPNeXtPAFPN", in_channels=[128, 256, 512], out_channels=128,
                  num_csp_blocks=1, expand_ratio=0.5, norm_cfg=norm, act_cfg=act),
        bbox_head=dict(
            type="RTMDetInsSepBNHead", num_classes=num_classes, in_channels=128,
            stacked_convs=2, share_conv=True, pred_kernel_size=1, feat_channels=128,
            act_cfg=dict(type="SiLU"), norm_cfg=dict(type="SyncBN", requires_grad=True),
            anchor_generator=dict(type="MlvlPointGenerator", offset=0, strides=[8, 16, 32]),
            bbox_coder=dict(type="DistancePointBBoxCoder"),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0,
                          loss_weight=1.0),
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
            loss_mask=dict(type="DiceLoss", loss_weight=1.0, eps=5e-6, reduction="mean")),
        train_cfg=dict(assigner=dict(type="DynamicSoftLabelAssigner", topk=13),
                       allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                      nms=dict(type="nms", iou_threshold=0.6), max_per_img=100,
                      mask_thr_binary=0.5))
    pad = dict(type="Pad", size=(640, 640), pad_val=dict(img=(114, 114, 114)))
    crop = dict(type="RandomCrop", crop_size=(640, 640), recompute_bbox=True,
                allow_negative_crop=True)
    train_pipeline = [
        dict(type="LoadImageFromFile"), _load_annotations(),
        dict(type="CachedMosaic", img_scale=(640, 640), pad_val=114.0),
        dict(type="RandomResize", scale=(1280, 1280), ratio_range=(0.5, 2.0), keep_ratio=True),
        crop, dict(type="YOLOXHSVRandomAug"), dict(type="RandomFlip", prob=0.5), pad,
        dict(type="CachedMixUp", img_scale=(640, 640), ratio_range=(1.0, 1.0),
             max_cached_images=20, pad_val=(114, 114, 114)),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1, 1)), dict(type="PackDetInputs")]
    stage2 = [
        dict(type="LoadImageFromFile"), _load_annotations(),
        dict(type="RandomResize", scale=(640, 640), ratio_range=(0.5, 2.0), keep_ratio=True),
        crop, dict(type="FilterAnnotations", min_gt_bbox_wh=(1, 1)),
        dict(type="YOLOXHSVRandomAug"), dict(type="RandomFlip", prob=0.5), pad,
        dict(type="PackDetInputs")]
    test_pipeline = [
        dict(type="LoadImageFromFile"), dict(type="Resize", scale=(640, 640), keep_ratio=True),
        pad, dict(type="PackDetInputs",
                  meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    schedule = [
        ("train_pipeline_stage2", stage2),
        ("max_epochs", 300),
        ("stage2_num_epochs", 20),
        ("base_lr", 0.004),
        ("interval", 10),
        ("train_cfg", dict(type="EpochBasedTrainLoop", max_epochs=_Ref("max_epochs"),
                           val_interval=_Ref("interval"),
                           dynamic_intervals=[(_Ref("max_epochs - stage2_num_epochs"), 1)])),
        ("val_cfg", dict(type="ValLoop")),
        ("test_cfg", dict(type="TestLoop")),
        ("optim_wrapper", dict(type="OptimWrapper",
                               optimizer=dict(type="AdamW", lr=_Ref("base_lr"),
                                              weight_decay=0.05),
                               paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0,
                                                  bypass_duplicate=True))),
        ("param_scheduler", [
            dict(type="LinearLR", start_factor=1.0e-5, by_epoch=False, begin=0, end=1000),
            dict(type="CosineAnnealingLR", eta_min=_Ref("base_lr * 0.05"),
                 begin=_Ref("max_epochs // 2"), end=_Ref("max_epochs"),
                 T_max=_Ref("max_epochs // 2"), by_epoch=True, convert_to_iter_based=True)]),
        # the learning rate above is for 8 GPUs x 32 images; scaled to the batch actually used
        ("auto_scale_lr", dict(enable=True, base_batch_size=256)),
        ("default_hooks", _hooks(dict(type="CheckpointHook", interval=_Ref("interval"),
                                      max_keep_ckpts=3))),
        ("custom_hooks", [
            dict(type="EMAHook", ema_type="ExpMomentumEMA", momentum=0.0002,
                 update_buffers=True, priority=49),
            dict(type="PipelineSwitchHook", switch_epoch=_Ref("max_epochs - stage2_num_epochs"),
                 switch_pipeline=_Ref("train_pipeline_stage2"))]),
    ]
    checkpoint = ("https://download.openmmlab.com/mmdetection/v3.0/rtmdet/cspnext_rsb_pretrain/"
                  "cspnext-s_imagenet_600e.pth")
    return [("checkpoint", checkpoint), ("model", model)], train_pipeline, test_pipeline, 8, \
        schedule


#: --mmdet-config name -> (MMDetection config it follows, builder)
TEMPLATES: Dict[str, Tuple[str, Callable]] = {
    "mask-rcnn_r50_fpn": ("mask-rcnn_r50_fpn_1x_coco", _mask_rcnn_r50_fpn),
    "rtmdet-ins_s": ("rtmdet-ins_s_8xb32-300e_coco", _rtmdet_ins_s),
}


def build_config(template: str, classes: Sequence[str], train_ann: str, val_ann: str) -> str:
    """The config file's text. ``classes``: the category names in id order (1..N);
    ``train_ann``/``val_ann``: annotation files relative to the dataset root."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown MMDetection config {template!r}; choose one of "
                         f"{', '.join(TEMPLATES)}")
    if not classes:
        raise ValueError("the dataset has no categories: nothing to train")
    origin, builder = TEMPLATES[template]
    model_part, train_pipeline, test_pipeline, batch, schedule = builder(_Ref("num_classes"))
    assignments: List[Tuple[str, object]] = [
        ("data_root", "{{ fileDirname }}/"),
        ("dataset_type", "CocoDataset"),
        ("classes", tuple(classes)),
        ("num_classes", len(classes)),
        ("metainfo", dict(classes=_Ref("classes"))),
        *model_part,
        *_data(train_pipeline, test_pipeline, batch, val_ann, train_ann),
        *schedule,
        *_RUNTIME,
    ]
    lines = [
        f"# MMDetection 3.x config written by `sam-backend export-coco --mmdet-config {template}`",
        f"# (model, pipeline and schedule of MMDetection's {origin}; the dataset filled in).",
        "# Train:  python tools/train.py " + "<this file>" + "   (in an MMDetection checkout)",
        "# data_root is this file's directory: move the dataset folder as a whole.",
        "# The masks are COCO RLE: LoadAnnotations needs poly2mask=True (set below).",
        "",
    ]
    for name, value in assignments:
        lines.append(f"{name} = {pprint.pformat(value, width=100, sort_dicts=False)}")
    return "\n".join(lines) + "\n"


def write_config(out_dir: str, template: str, classes: Sequence[str], train_ann: str,
                 val_ann: str) -> Path:
    """Write ``<out_dir>/<template>.py`` (see :func:`build_config`); returns its path."""
    text = build_config(template, classes, train_ann, val_ann)
    path = Path(out_dir) / f"{template}.py"
    atomic_write(path, text)
    logger.info("wrote the MMDetection config %s (%d classes)", path, len(classes))
    return path
