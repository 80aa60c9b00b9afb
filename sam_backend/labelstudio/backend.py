"""The Label Studio ML model class: thin, it hands each request to the shared service.

label-studio-ml's convention is a ``LabelStudioMLBase`` subclass whose ``predict`` turns tasks
into predictions. Instances are cheap (one per request or per /setup): the model, the embedding
cache and the image loader live once per process in the :class:`SegmentationService`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from label_studio_ml.model import LabelStudioMLBase

from sam_backend.labelstudio.service import SegmentationService
from sam_backend.settings import Settings


class SamBackend(LabelStudioMLBase):
    def __init__(self, label_config: Optional[str] = None, *,
                 service: Optional[SegmentationService] = None, project: Any = None, **options):
        # label-studio-ml parses the config with its own parser; ours finds controls by type.
        super().__init__(label_config=None, **{k: v for k, v in options.items()
                                                if k in ("hostname", "access_token")})
        self.label_config = label_config
        self.project = project
        known = {k: v for k, v in options.items() if k in Settings.option_names()}
        self.service = service or SegmentationService.from_settings(Settings.load(known))

    def predict(self, tasks: List[Dict[str, Any]], context: Any = None,
                **kwargs) -> List[Dict[str, Any]]:
        return self.service.predict(tasks, self.label_config, context, self.project)

    def fit(self, *args, **kwargs) -> Dict[str, Any]:
        return {}  # interactive segmentation only: annotations do not retrain the model
