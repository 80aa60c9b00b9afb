"""The one Label Studio API client (:mod:`sam_backend.labelstudio.api`): a project's tasks are
paged in one place, used by `sam-backend precompute --project` and `sam-backend annotate`.
Against the loopback stand-in with Label Studio's shapes and pagination."""
from __future__ import annotations

from pathlib import Path

import pytest

from sam_backend.errors import ConfigError, ImageError, SamBackendError
from sam_backend.images.config import ImageAccessSettings
from sam_backend.images.loader import ImageLoader
from sam_backend.labelstudio.api import LabelStudioAPI
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI
from tests.support.payloads import FULL_CONFIG

PACKAGE = Path(__file__).resolve().parents[2] / "sam_backend"


def client(url, token=API_TOKEN) -> LabelStudioAPI:
    return LabelStudioAPI(ImageLoader(ImageAccessSettings(label_studio_url=url, api_key=token,
                                                          cache_max_bytes=0, timeout=5.0)))


@pytest.fixture
def fake():
    servers = []

    def start(count: int) -> FakeLabelStudioAPI:
        tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i % 7}.png"}}
                 for i in range(1, count + 1)]
        servers.append(FakeLabelStudioAPI(FULL_CONFIG, tasks))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def task_pages(server):
    return [r for r in server.requests if r.startswith("/api/tasks")]


def test_every_page_is_read_once_in_order(fake):
    server = fake(250)
    api = client(server.url)
    assert [t["id"] for t in api.tasks(1, page_size=100)] == list(range(1, 251))
    assert len(task_pages(server)) == 3
    assert [t["id"] for t in api.newest_tasks(1, page_size=100)] == list(range(250, 0, -1))


@pytest.mark.parametrize("count,pages", [(200, 2), (0, 1), (99, 1)])
def test_paging_stops_at_the_total_without_asking_past_the_last_page(fake, count, pages):
    """Label Studio answers 404 past the last page: a full last page must not lead to one more."""
    server = fake(count)
    assert len(client(server.url).tasks(1, page_size=100)) == count
    assert len(task_pages(server)) == pages


def test_the_project_and_its_config(fake):
    server = fake(1)
    api = client(server.url)
    assert api.project(1)["id"] == 1
    assert api.label_config(1) == FULL_CONFIG


def test_a_refused_key_is_a_clear_error(fake):
    server = fake(3)
    with pytest.raises(ImageError, match="refused /api/tasks .*HTTP 401.*LABEL_STUDIO_API_KEY"):
        client(server.url, token="0" * 40).tasks(1)


def test_predictions_are_posted_and_found_by_model_version(fake):
    server = fake(3)
    api = client(server.url)
    api.add_prediction(2, {"result": [], "score": 0.5, "model_version": "v1"})
    api.add_prediction(3, {"result": [], "model_version": "v2"})
    assert api.predicted_tasks(1, "v1") == {2}
    assert server.predictions[0]["task"] == 2
    with pytest.raises(SamBackendError, match="401 to POST /api/predictions"):
        client(server.url, token="0" * 40).add_prediction(1, {"result": []})


def test_an_unknown_address_is_a_config_error():
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL"):
        client(None)


def test_no_other_module_pages_tasks():
    """One client: `/api/tasks` is asked for in labelstudio/api.py only."""
    askers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                    if '"/api/tasks"' in p.read_text(encoding="utf-8"))
    assert askers == ["labelstudio/api.py"]
