"""The one client of Label Studio's REST API, used by every command that reads a project
(``sam-backend precompute --project``, ``sam-backend annotate``, the exporters' and
``sam-backend preview``'s ``--project``).

Reads go through the image loader's :meth:`~sam_backend.images.loader.ImageLoader.api_get` (the
same address, token, personal-access-token refresh, network policy, deadline and error messages
as image downloads); writes (``POST /api/predictions``, ``DELETE /api/predictions/<id>/``)
carry the same ``Authorization``. A project's tasks are paged here, once: Label Studio's data
manager answers ``GET /api/tasks?project=&page=&page_size=`` with ``{"tasks": [...], "total": n}``
(a bare list on some versions) and 404 past the last page.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

import requests

from sam_backend.errors import ConfigError, SamBackendError

PAGE_SIZE = 100


class LabelStudioAPI:
    """The calls the commands make, authenticated like the image loader ``images``."""

    def __init__(self, images, timeout: float = 60.0):
        if not images.label_studio_url:
            raise ConfigError("Label Studio's address is unknown: set LABEL_STUDIO_URL or pass "
                              "--url http://host:8080")
        self.images = images
        self.timeout = timeout
        self._session: Optional[requests.Session] = None

    @property
    def base(self) -> str:
        return self.images.label_studio_url.rstrip("/")

    def get(self, path: str, params: Optional[dict] = None) -> Any:
        """``GET`` an ``/api/...`` path: the parsed JSON."""
        return self.images.api_get(path, params)

    def post(self, path: str, body: Dict[str, Any]) -> Any:
        """``POST`` JSON to an ``/api/...`` path (a refused personal access token is refreshed
        once): the parsed JSON answer, or None."""
        return self.send("POST", path, body)

    def send(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        """``method`` (POST, DELETE, ...) on an ``/api/...`` path with the loader's
        ``Authorization`` (a refused personal access token is refreshed once): the parsed JSON
        answer, or None."""
        if self._session is None:
            self._session = requests.Session()
        for attempt in (0, 1):
            headers = self.images.label_studio_headers(force_refresh=attempt == 1)
            try:
                response = self._session.request(method, self.base + path, json=body,
                                                 headers=headers, timeout=self.timeout,
                                                 allow_redirects=False)
            except requests.RequestException as exc:
                raise SamBackendError(f"Label Studio at {self.base} did not answer {method} "
                                      f"{path}: {type(exc).__name__}") from exc
            if response.status_code != 401 or attempt == 1:
                break
        if response.status_code >= 400 or response.is_redirect:
            raise SamBackendError(f"Label Studio answered {response.status_code} to {method} "
                                  f"{path}: {response.text[:300]}")
        return response.json() if response.content else None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    # -- projects, tasks, predictions -------------------------------------------------------------
    def project(self, project_id: int) -> Dict[str, Any]:
        body = self.get(f"/api/projects/{project_id}")
        if not isinstance(body, dict):
            raise SamBackendError(f"Label Studio's /api/projects/{project_id} answered "
                                  f"{type(body).__name__}, expected a project object")
        return body

    def label_config(self, project_id: int) -> str:
        """The project's labeling config (XML text; empty when it has none)."""
        return self.project(project_id).get("label_config") or ""

    def tasks(self, project_id: int, page_size: int = PAGE_SIZE,
              annotations: bool = False) -> List[Dict[str, Any]]:
        """Every task of the project, in Label Studio's order, each page read once.
        ``annotations``: each task as Label Studio's JSON export holds it, with its annotations
        (``fields=all``: annotations, drafts and predictions, left out by default) and its data
        as stored (``resolve_uri=false``: cloud URLs not turned into presign links)."""
        tasks: List[Dict[str, Any]] = []
        extra = {"fields": "all", "resolve_uri": "false"} if annotations else {}
        page = 1
        while True:
            body = self.get("/api/tasks", {"project": project_id, "page": page,
                                           "page_size": page_size, **extra})
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            if not isinstance(batch, list):
                raise SamBackendError(f"Label Studio's /api/tasks answered {type(body).__name__}, "
                                      "expected {\"tasks\": [...]}")
            tasks.extend(t for t in batch if isinstance(t, dict))
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or len(batch) < page_size or (total is not None and len(tasks) >= total):
                return tasks
            page += 1

    def newest_tasks(self, project_id: int, page_size: int = PAGE_SIZE) -> List[Dict[str, Any]]:
        """:meth:`tasks`, newest (highest id) first."""
        tasks = self.tasks(project_id, page_size)
        tasks.sort(key=lambda t: int(t.get("id") or 0), reverse=True)
        return tasks

    def predictions(self, **filters: Any) -> List[Dict[str, Any]]:
        """``GET /api/predictions`` with ``filters`` (``project=``, ``task=``): the predictions,
        whether Label Studio answers a list or a paginated ``{"results": [...]}``."""
        predictions = self.get("/api/predictions", filters)
        if isinstance(predictions, dict):  # paginated answers
            predictions = predictions.get("results", [])
        return [p for p in predictions or [] if isinstance(p, dict)]

    def predicted_tasks(self, project_id: int, model_version: str) -> Set[int]:
        """Ids of the tasks that already have a prediction of ``model_version``."""
        return {p["task"] for p in self.predictions(project=project_id)
                if p.get("model_version") == model_version}

    def add_prediction(self, task_id: int, prediction: Dict[str, Any]) -> None:
        self.post("/api/predictions", {"task": task_id, **prediction})

    def task_predictions(self, task_id: int) -> List[Dict[str, Any]]:
        """The predictions Label Studio holds for task ``task_id``."""
        return [p for p in self.predictions(task=task_id) if p.get("task") == task_id]

    def delete_prediction(self, prediction_id: int) -> None:
        self.send("DELETE", f"/api/predictions/{int(prediction_id)}/")
