"""A small shapes project behind the loopback stand-in of Label Studio's API, and the settings of
a quick training run on it (the reduced RF-DETR from random weights, images read from a local
document root): what the runner, jobs and ``sam-backend train`` tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from sam_backend.settings import Settings
from tests.support.shapes import SHAPES_CONFIG, shapes_project
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

#: a quick run: these images are small and the reduced model trains a few seconds per epoch
QUICK = {"trainer": "rf_detr", "train_random_init": "true", "train_epochs": "1",
         "train_batch_size": "4", "train_min_tasks": "6", "device": "cpu",
         "concept_model": "none", "image_cache_bytes": "0"}


class ShapesProject:
    """``n`` shape images in ``root/images`` served as ``/data/local-files/?d=<name>`` tasks by
    a :class:`FakeLabelStudioAPI`; ``missing``: task ids whose image file is removed."""

    def __init__(self, root: Path, n: int = 12, missing: tuple = (), seed: int = 0):
        self.images = Path(root) / "images"
        self.tasks: List[dict] = shapes_project(
            self.images, n, seed=seed, width=96, height=72,
            url_for=lambda path: f"/data/local-files/?d={path.name}")
        for task in self.tasks:
            if task["id"] in missing:
                (self.images / task["data"]["image"].split("d=", 1)[1]).unlink()
        self.api = FakeLabelStudioAPI(SHAPES_CONFIG, self.tasks)
        self.trained = Path(root) / "trained"

    @property
    def project(self) -> int:
        return self.api.project

    def options(self, **extra: Any) -> Dict[str, str]:
        options = dict(QUICK, trained_dir=str(self.trained),
                       local_files_document_root=str(self.images),
                       label_studio_url=self.api.url, label_studio_api_key=API_TOKEN)
        options.update({k: str(v) for k, v in extra.items()})
        return options

    def settings(self, **extra: Any) -> Settings:
        return Settings.load(self.options(**extra), environ={})

    def with_args(self, **extra: Any) -> List[str]:
        return [f"{k}={v}" for k, v in self.options(**extra).items()]

    def stop(self) -> None:
        self.api.stop()
