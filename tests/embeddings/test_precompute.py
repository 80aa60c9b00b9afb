"""`sam-backend precompute --project`: it lists the project's tasks through the one Label Studio
client (paging is tested in tests/labelstudio/test_api.py) and needs the shared store."""
from __future__ import annotations

import pytest

from sam_backend.commands import annotate, precompute
from sam_backend.errors import ConfigError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.labelstudio import api as ls_api
from sam_backend.settings import Settings
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI
from tests.support.payloads import FULL_CONFIG


@pytest.fixture
def api():
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i % 7}.png"}} for i in range(1, 251)]
    server = FakeLabelStudioAPI(FULL_CONFIG, tasks)
    yield server
    server.stop()


def loader(url, token=API_TOKEN):
    return ImageLoader(ImageAccessSettings(label_studio_url=url, api_key=token, cache_max_bytes=0,
                                           timeout=5.0))


def test_precompute_needs_a_store(api):
    with pytest.raises(ConfigError, match="embedding_store"):
        precompute.precompute_project(Settings.load({}, environ={}), loader(api.url), 1,
                                      progress=False)


def test_precompute_and_annotate_share_one_client():
    assert precompute.LabelStudioAPI is annotate.LabelStudioAPI is ls_api.LabelStudioAPI
