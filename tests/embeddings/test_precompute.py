"""`sam-backend precompute --project`: listing a project's tasks through Label Studio's API
(a loopback stand-in with Label Studio's shapes and pagination)."""
from __future__ import annotations

import pytest

from sam_backend.errors import ConfigError, ImageError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.embeddings.precompute import precompute_project, project_tasks
from sam_backend.settings import Settings
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI
from tests.support.payloads import FULL_CONFIG


@pytest.fixture
def api():
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i % 7}.png"}} for i in range(1, 251)]
    server = FakeLabelStudioAPI(FULL_CONFIG, tasks)
    yield server
    server.stop()


def loader(url, token=API_TOKEN, tmp_path=None):
    return ImageLoader(ImageAccessSettings(label_studio_url=url, api_key=token, cache_max_bytes=0,
                                           timeout=5.0))


def test_every_page_is_read_and_tasks_come_newest_first(api):
    tasks = project_tasks(loader(api.url), 1, page_size=100)
    assert [t["id"] for t in tasks] == list(range(250, 0, -1))
    assert sum(1 for r in api.requests if r.startswith("/api/tasks")) == 3


def test_a_refused_key_is_a_clear_error(api):
    with pytest.raises(ImageError, match="refused /api/tasks .*HTTP 401.*LABEL_STUDIO_API_KEY"):
        project_tasks(loader(api.url, token="0" * 40), 1)


def test_precompute_needs_a_store(api):
    with pytest.raises(ConfigError, match="embedding_store"):
        precompute_project(Settings.load({}, environ={}), loader(api.url), 1, progress=False)
