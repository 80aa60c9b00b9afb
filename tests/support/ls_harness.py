"""Install, start and drive a real Label Studio for end-to-end tests.

Importable without pytest. The pieces:

- :func:`ensure_label_studio_venv` installs ``label-studio==1.23.2`` into its own venv (cached,
  file-locked, marker-checked) and prepares a migrated template database so that every fresh
  instance starts in ~10 s instead of ~60 s.
- :class:`LabelStudio` starts one headless instance on a free loopback port with a fresh data dir.
- :class:`LabelStudioClient` is a small ``requests`` client for the API calls the tests need, for
  both auth flows: the legacy ``Authorization: Token <key>`` and personal access tokens
  (JWT refresh token -> ``POST /api/token/refresh/`` -> ``Authorization: Bearer <access>``).
- :class:`BackendProcess` runs any command (the ML backend) in its own process group, waits for
  ``GET /health`` == 200, logs to a file, and can be restarted.

What was learned from the real Label Studio 1.23.2 is written down in ``README.md`` next to this
file. Command line: ``python -m tests.support.ls_harness setup`` (install only) or ``... serve``
(start one instance and print its URL and credentials until Ctrl-C).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import requests

LS_VERSION = "1.23.2"
LS_PACKAGE = f"label-studio=={LS_VERSION}"
DEFAULT_USERNAME = "admin@example.com"
MARKER_NAME = ".sam_backend_install_ok"
TEMPLATE_DIR_NAME = "sam_backend_template_db"
DB_FILE_NAME = "label_studio.sqlite3"

#: simplejwt's default ACCESS_TOKEN_LIFETIME is 5 min (LS 1.23 does not override it); refresh
#: a little earlier than that.
ACCESS_TOKEN_REFRESH_AFTER_S = 240

logger = logging.getLogger("sam_backend.e2e.ls_harness")
if not any(getattr(h, "_ls_harness", False) for h in logger.handlers):
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("[ls_harness %(asctime)s] %(message)s", "%H:%M:%S"))
    _handler._ls_harness = True  # type: ignore[attr-defined]
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


class HarnessError(RuntimeError):
    """Installing or starting something failed; the message carries the relevant log tail."""


class LabelStudioAPIError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.method, self.url, self.status, self.body = method, url, status, body


# ----------------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path | str, lines: int = 60) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(data.splitlines()[-lines:])


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for lock %s (another process is installing)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
            logger.info("got lock %s after %.0f s", path, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_logged(cmd: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                cwd: str | Path | None = None, timeout: float, what: str) -> None:
    """Run ``cmd`` to completion with output appended to ``log_path``; log a heartbeat."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd,
                                start_new_session=True)
    t0 = time.monotonic()
    next_beat = t0 + 20
    while True:
        try:
            rc = proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now - t0 > timeout:
                _kill_group(proc)
                raise HarnessError(f"{what} timed out after {timeout:.0f} s; log {log_path}:\n"
                                   f"{tail(log_path)}")
            if now >= next_beat:
                last = tail(log_path, 1).strip()[:150]
                logger.info("%s: %.0f s ... %s", what, now - t0, last)
                next_beat = now + 20
    if rc != 0:
        raise HarnessError(f"{what} failed (exit {rc}); log {log_path}:\n{tail(log_path)}")
    logger.info("%s: done in %.0f s", what, time.monotonic() - t0)


def _kill_group(proc: subprocess.Popen, term_timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session), then SIGKILL."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stray children of a dead leader
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=term_timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# Environment variables Label Studio reads (it looks up LABEL_STUDIO_X, HEARTEX_X and plain X) that
# could leak in from the caller's environment and change what the tests see.
_LS_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "POSTGRE_", "MYSQL_", "REDIS_",
                    "SENTRY_", "FRONTEND_SENTRY_", "FEATURE_FLAGS_", "fflag")
_LS_ENV_NAMES = {"HOST", "PORT", "DEBUG", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME",
                 "DATABASE_URL", "LOCAL_FILES_SERVING_ENABLED", "LOCAL_FILES_DOCUMENT_ROOT",
                 "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "ENABLE_LEGACY_API_TOKEN",
                 "BASE_DATA_DIR", "PYTHONPATH", "VIRTUAL_ENV"}

#: Settings that keep Label Studio quiet and on this machine (no Sentry, analytics, PyPI check).
QUIET_ENV = {
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
    "LATEST_VERSION_CHECK": "false",
    "PYTHONUNBUFFERED": "1",
}


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LS_ENV_PREFIXES) and k not in _LS_ENV_NAMES}
    env.update(QUIET_ENV)
    if extra:
        env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# installation


def default_venv_path() -> Path:
    env = os.environ.get("SAM_BACKEND_LS_VENV")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "sam_backend" / f"label-studio-{LS_VERSION}"


def _installed_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "label-studio").exists() or not py.exists():
        return None
    # Not `label-studio --version`: in 1.23.2 that applies migrations to ~/.local/share/label-studio
    # and then *starts the server* on 0.0.0.0:8080 (the version flag does not stop it).
    try:
        out = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
            capture_output=True, text=True, timeout=60, env=_clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _venv_ok(venv: Path) -> bool:
    marker = venv / MARKER_NAME
    try:
        if marker.read_text().strip() != LS_PACKAGE:
            return False
    except OSError:
        return False
    return _installed_version(venv) == LS_VERSION


def ensure_label_studio_venv(venv: Path | str | None = None, *, template_db: bool = True) -> Path:
    """Return a venv with ``label-studio==1.23.2``, installing it first if needed.

    The venv lives at ``venv``, ``$SAM_BACKEND_LS_VENV`` or
    ``~/.cache/sam_backend/label-studio-1.23.2``. It counts as installed only when the marker file
    written after a successful install is there and ``bin/label-studio`` exists and the package
    reports version 1.23.2; anything else (e.g. a half-finished install) is wiped and redone.
    A file lock next to the venv serialises concurrent callers. Extra pip arguments can be given in
    ``$SAM_BACKEND_LS_PIP_ARGS``; the interpreter used to create the venv in
    ``$SAM_BACKEND_LS_PYTHON`` (default: the current one).

    With ``template_db`` (default) it also prepares a fully migrated, user-less SQLite database
    that :class:`LabelStudio` copies into each fresh data dir (see :func:`ensure_template_db`).
    """
    venv = Path(venv).expanduser().absolute() if venv else default_venv_path()
    lock = venv.parent / f".{venv.name}.lock"
    with file_lock(lock):
        if _venv_ok(venv):
            logger.info("label-studio %s venv ready at %s", LS_VERSION, venv)
        else:
            _install(venv)
    if template_db:
        ensure_template_db(venv)
    return venv


def _install(venv: Path) -> None:
    log_path = venv.parent / f"{venv.name}.install.log"
    if venv.exists():
        logger.info("removing incomplete or outdated venv %s", venv)
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"installing {LS_PACKAGE} into {venv} at {time.ctime()}\n")
    python = os.environ.get("SAM_BACKEND_LS_PYTHON") or sys.executable
    t0 = time.monotonic()
    logger.info("installing %s into %s (~1.5-2 min, ~1 GB); log %s", LS_PACKAGE, venv, log_path)
    env = _clean_env()
    _run_logged([python, "-m", "venv", str(venv)], log_path, env=env, timeout=300,
                what="create venv")
    pip_args = shlex.split(os.environ.get("SAM_BACKEND_LS_PIP_ARGS", ""))
    _run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", *pip_args, LS_PACKAGE], log_path, env=env, timeout=1800,
                what=f"pip install {LS_PACKAGE}")
    version = _installed_version(venv)
    if version != LS_VERSION:
        raise HarnessError(f"after install, {venv} reports label-studio {version!r}, "
                           f"expected {LS_VERSION}; log {log_path}:\n{tail(log_path)}")
    (venv / MARKER_NAME).write_text(LS_PACKAGE + "\n")
    logger.info("installed %s in %.0f s", LS_PACKAGE, time.monotonic() - t0)


_MIGRATE_SCRIPT = """
import os, sys
import label_studio
# what label_studio.server._setup_env() + _apply_database_migrations() do, minus the server
sys.path.insert(0, os.path.dirname(label_studio.__file__))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'label_studio.core.settings.label_studio')
from django.core.wsgi import get_wsgi_application
get_wsgi_application()
from django.core.management import call_command
call_command('migrate', '--no-color', verbosity=0)
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
ex = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
pending = ex.migration_plan(ex.loader.graph.leaf_nodes())
assert not pending, pending
print('migrated OK')
"""


def template_db_path(venv: Path | str) -> Path:
    return Path(venv) / TEMPLATE_DIR_NAME / DB_FILE_NAME


def ensure_template_db(venv: Path | str) -> Path | None:
    """Build (once per venv) a migrated SQLite DB with no users in it.

    A fresh Label Studio spends ~40-70 s of its first start applying migrations; starting on a
    copy of an already-migrated DB takes ~6-10 s. User, organisation (and thereby the legacy
    token setting) are still created by ``label-studio start`` in each instance. Set
    ``SAM_BACKEND_LS_NO_TEMPLATE=1`` to skip this and let every instance migrate itself.
    """
    if os.environ.get("SAM_BACKEND_LS_NO_TEMPLATE"):
        return None
    venv = Path(venv)
    db = template_db_path(venv)
    ok = db.parent / ".ok"
    if ok.exists() and db.exists():
        return db
    with file_lock(venv.parent / f".{venv.name}.template.lock"):
        if ok.exists() and db.exists():
            return db
        logger.info("building migrated template DB for label-studio %s (~1 min, once)", LS_VERSION)
        shutil.rmtree(db.parent, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="ls-template-", dir=venv))
        try:
            data = work / "data"
            data.mkdir()
            _run_logged([str(venv / "bin" / "python"), "-c", _MIGRATE_SCRIPT], work / "migrate.log",
                        env=_clean_env({"LABEL_STUDIO_BASE_DATA_DIR": str(data)}), cwd=work,
                        timeout=900, what="migrate template DB")
            db.parent.mkdir(parents=True)
            shutil.copy2(data / DB_FILE_NAME, db)
            ok.write_text(LS_PACKAGE + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return db


# ----------------------------------------------------------------------------------------------
# API client


class LabelStudioClient:
    """Minimal Label Studio REST client.

    Auth modes: ``token=`` (legacy ``Authorization: Token <key>``), ``personal_access_token=``
    (JWT refresh token; exchanged at ``POST /api/token/refresh/`` for a 5-minute access token sent
    as ``Authorization: Bearer <access>``, refreshed automatically), or a logged-in session
    (:meth:`login`, cookie based; what the browser does).
    """

    def __init__(self, base_url: str, *, token: str | None = None,
                 personal_access_token: str | None = None, session: requests.Session | None = None,
                 timeout: float = 120.0):
        if token and personal_access_token:
            raise ValueError("give either a legacy token or a personal access token")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.pat = personal_access_token
        self.timeout = timeout
        self.session = session or requests.Session()
        self.mode = "token" if token else "bearer" if personal_access_token else "session"
        self._access: str | None = None
        self._access_time = 0.0
        self._own_pat: str | None = None

    # -- auth -------------------------------------------------------------------------------

    @classmethod
    def login(cls, base_url: str, email: str, password: str, **kw) -> "LabelStudioClient":
        """Session login through the HTML form at ``/user/login/`` (needs the CSRF cookie)."""
        base_url = base_url.rstrip("/")
        s = requests.Session()
        r = s.get(f"{base_url}/user/login/", timeout=60)
        r.raise_for_status()
        csrf = s.cookies.get("csrftoken", "")
        r = s.post(f"{base_url}/user/login/",
                   data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                   headers={"Referer": f"{base_url}/user/login/"}, allow_redirects=False, timeout=60)
        if r.status_code != 302:
            raise LabelStudioAPIError("POST", f"{base_url}/user/login/", r.status_code,
                                      "login failed (expected a 302 redirect): " + r.text[:500])
        client = cls(base_url, session=s, **kw)
        client.whoami()  # proves the session works
        return client

    def refresh_access_token(self, pat: str | None = None) -> str:
        """``POST /api/token/refresh/ {"refresh": PAT}`` -> access token (no other auth needed)."""
        pat = pat or self.pat
        if not pat:
            raise ValueError("no personal access token")
        url = f"{self.base_url}/api/token/refresh/"
        r = requests.post(url, json={"refresh": pat}, timeout=60)
        if r.status_code != 200:
            raise LabelStudioAPIError("POST", url, r.status_code, r.text)
        return r.json()["access"]

    def _bearer(self, force: bool = False) -> str:
        if force or not self._access or time.monotonic() - self._access_time > ACCESS_TOKEN_REFRESH_AFTER_S:
            self._access = self.refresh_access_token()
            self._access_time = time.monotonic()
        return self._access

    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate a plain request (e.g. an image download) the same way."""
        if self.mode == "token":
            return {"Authorization": f"Token {self.token}"}
        if self.mode == "bearer":
            return {"Authorization": f"Bearer {self._bearer()}"}
        return {}

    # -- plumbing -----------------------------------------------------------------------------

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + ("" if path.startswith("/") else "/") + path

    def raw(self, method: str, path: str, **kw) -> requests.Response:
        """Authenticated request; returns the response whatever its status."""
        kw.setdefault("timeout", self.timeout)
        headers = dict(kw.pop("headers", None) or {})
        url = self.url(path)
        r = self.session.request(method, url, headers={**self.auth_headers(), **headers}, **kw)
        if r.status_code == 401 and self.mode == "bearer":  # access token expired early
            self._bearer(force=True)
            for v in kw.values():  # rewind uploads before retrying
                if isinstance(v, dict):
                    for f in v.values():
                        fh = f[1] if isinstance(f, tuple) else f
                        if hasattr(fh, "seek"):
                            fh.seek(0)
            r = self.session.request(method, url, headers={**self.auth_headers(), **headers}, **kw)
        return r

    def request(self, method: str, path: str, **kw) -> requests.Response:
        r = self.raw(method, path, **kw)
        if not r.ok:
            raise LabelStudioAPIError(method, self.url(path), r.status_code, r.text)
        return r

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, json_body: Any = None, **kw) -> Any:
        r = self.request("POST", path, json=json_body, **kw)
        return r.json() if r.content else None

    def download(self, path_or_url: str, **kw) -> requests.Response:
        """GET with this client's auth, e.g. ``/data/upload/1/x.png``; status not checked."""
        return self.raw("GET", path_or_url, **kw)

    # -- users & tokens -----------------------------------------------------------------------

    def whoami(self) -> dict:
        return self.get("/api/current-user/whoami")

    def jwt_settings(self) -> dict:
        """``GET /api/jwt/settings`` -> {"api_tokens_enabled", "legacy_api_tokens_enabled"}."""
        return self.get("/api/jwt/settings")

    def update_jwt_settings(self, **fields: bool) -> dict:
        current = self.jwt_settings()
        current.update(fields)
        return self.post("/api/jwt/settings", current)

    def get_personal_access_token(self) -> str:
        """Create (once) and return this user's personal access token (a JWT refresh token).

        ``POST /api/token/`` -> 201 ``{"token": <full JWT>}``; the full token is shown only once.
        A user may hold one live token: a second POST gives 409, so any existing tokens
        (``GET /api/token/`` lists them truncated, without signature) are revoked with
        ``POST /api/token/blacklist/ {"refresh": <truncated token>}`` and a new one is created.
        Needs the org's ``api_tokens_enabled`` (on by default, see ``/api/jwt/settings``) and a
        client authenticated somehow (legacy token while enabled, session login, or Bearer).
        """
        if self.mode == "bearer" and self.pat:
            return self.pat
        if self._own_pat:
            return self._own_pat
        if not self.jwt_settings().get("api_tokens_enabled", True):
            self.update_jwt_settings(api_tokens_enabled=True)
        r = self.raw("POST", "/api/token/")
        if r.status_code == 409:
            for tok in self.get("/api/token/"):
                self.raw("POST", "/api/token/blacklist/", json={"refresh": tok["token"]})
            r = self.raw("POST", "/api/token/")
        if r.status_code != 201:
            raise LabelStudioAPIError("POST", self.url("/api/token/"), r.status_code, r.text)
        self._own_pat = r.json()["token"]
        return self._own_pat

    # -- projects, tasks, annotations -------------------------------------------------------

    def create_project(self, title: str, label_config: str, **extra: Any) -> dict:
        """``POST /api/projects`` (title needs >= 3 characters)."""
        return self.post("/api/projects", {"title": title, "label_config": label_config, **extra})

    def get_project(self, project_id: int) -> dict:
        return self.get(f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict:
        return self.request("PATCH", f"/api/projects/{project_id}", json=fields).json()

    def list_tasks(self, project_id: int, page_size: int = 100) -> list[dict]:
        """All tasks of a project, via ``GET /api/tasks?project=<id>&page=N&page_size=M``
        (the data manager API: answers ``{"tasks": [...], "total": n, ...}``)."""
        tasks: list[dict] = []
        page = 1
        while True:
            data = self.get("/api/tasks", params={"project": project_id, "page": page,
                                                  "page_size": page_size})
            tasks.extend(data["tasks"])
            if not data["tasks"] or len(tasks) >= data.get("total", 0):
                return tasks
            page += 1

    def get_task(self, task_id: int) -> dict:
        return self.get(f"/api/tasks/{task_id}")

    def import_image(self, project_id: int, path: str | Path, filename: str | None = None,
                     content_type: str | None = None) -> list[dict]:
        """Upload one image file (multipart ``POST /api/projects/<id>/import``); return the new
        task(s). The task's ``data.image`` becomes ``/data/upload/<project>/<prefix>-<name>``."""
        path = Path(path)
        before = {t["id"] for t in self.list_tasks(project_id)}
        if content_type is None:
            suffix = path.suffix.lower()
            content_type = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                            ".webp": "image/webp", ".bmp": "image/bmp", ".gif": "image/gif",
                            ".tif": "image/tiff", ".tiff": "image/tiff"}.get(suffix,
                                                                             "application/octet-stream")
        with open(path, "rb") as fh:
            res = self.post(f"/api/projects/{project_id}/import",
                            files={"file": (filename or path.name, fh, content_type)})
        if not res or res.get("task_count", 0) < 1:
            raise LabelStudioAPIError("POST", self.url(f"/api/projects/{project_id}/import"), 201,
                                      f"no task created: {res}")
        new = [t for t in self.list_tasks(project_id) if t["id"] not in before]
        return sorted(new, key=lambda t: t["id"])

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """JSON import, e.g. ``[{"data": {"image": "/data/local-files/?d=..."}}]``."""
        return self.post(f"/api/projects/{project_id}/import", tasks)

    def create_annotation(self, task_id: int, result: list[dict], **extra: Any) -> dict:
        """``POST /api/tasks/<id>/annotations/ {"result": [...]}``."""
        return self.post(f"/api/tasks/{task_id}/annotations/", {"result": result, **extra})

    def list_annotations(self, task_id: int) -> list[dict]:
        return self.get(f"/api/tasks/{task_id}/annotations/")

    # -- ML backends ---------------------------------------------------------------------------

    def add_ml_backend(self, project_id: int, url: str, is_interactive: bool = True,
                       title: str | None = None, **extra: Any) -> dict:
        """``POST /api/ml {"url", "project", "is_interactive"}``. Label Studio calls the backend's
        ``GET /health`` and ``POST /setup`` before answering (400 if they fail)."""
        body: dict[str, Any] = {"url": url, "project": project_id, "is_interactive": is_interactive}
        if title is not None:
            body["title"] = title
        body.update(extra)
        return self.post("/api/ml", body)

    def list_ml_backends(self, project_id: int) -> list[dict]:
        return self.get("/api/ml", params={"project": project_id})

    def get_ml_backend(self, ml_id: int) -> dict:
        return self.get(f"/api/ml/{ml_id}")

    def delete_ml_backend(self, ml_id: int) -> None:
        self.request("DELETE", f"/api/ml/{ml_id}")

    def interactive_annotating(self, ml_id: int, task_id: int, context: dict) -> dict:
        """What the browser does on a smart-tool click:
        ``POST /api/ml/<ml_id>/interactive-annotating {"task": id, "context": context}``.
        Answers 200 with ``{"data": results[0]}`` or 200 with ``{"errors": [...]}``."""
        return self.post(f"/api/ml/{ml_id}/interactive-annotating",
                         {"task": task_id, "context": context})

    # -- export --------------------------------------------------------------------------------

    def export_formats(self, project_id: int) -> list[dict]:
        """``GET /api/projects/<id>/export/formats``: name, title, ``disabled`` (true when the
        converter thinks the label config does not fit the format)."""
        return self.get(f"/api/projects/{project_id}/export/formats")

    def export(self, project_id: int, fmt: str = "JSON", *, download_all_tasks: bool = False,
               **params: Any) -> bytes:
        """Synchronous export ``GET /api/projects/<id>/export?exportType=<FMT>`` (works in the
        open-source 1.23.2; deprecated only in Enterprise). JSON/JSON_MIN give a ``.json`` file;
        COCO, BRUSH_TO_COCO, YOLO... give a zip. Only annotated tasks unless
        ``download_all_tasks``."""
        q = {"exportType": fmt, **params}
        if download_all_tasks:
            q["download_all_tasks"] = "true"
        return self.request("GET", f"/api/projects/{project_id}/export", params=q).content

    def export_snapshot(self, project_id: int, fmt: str = "JSON", timeout: float = 120.0) -> bytes:
        """The snapshot API: ``POST /api/projects/<id>/exports/`` (JSON snapshot, built
        synchronously in OSS), for other formats ``POST .../exports/<eid>/convert
        {"export_type": FMT}`` and poll ``GET .../exports/<eid>`` ``converted_formats``, then
        ``GET .../exports/<eid>/download?exportType=FMT``."""
        snap = self.post(f"/api/projects/{project_id}/exports/", {})
        eid = snap["id"]
        deadline = time.monotonic() + timeout
        while snap.get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise HarnessError(f"export snapshot {eid} not completed: {snap}")
            time.sleep(0.5)
            snap = self.get(f"/api/projects/{project_id}/exports/{eid}")
        if snap["status"] != "completed":
            raise HarnessError(f"export snapshot {eid} failed: {snap}")
        if fmt != "JSON":
            self.post(f"/api/projects/{project_id}/exports/{eid}/convert", {"export_type": fmt})
            while True:
                snap = self.get(f"/api/projects/{project_id}/exports/{eid}")
                conv = [c for c in snap.get("converted_formats", []) if c["export_type"] == fmt]
                if conv and conv[0]["status"] == "completed":
                    break
                if conv and conv[0]["status"] == "failed":
                    raise HarnessError(f"export conversion to {fmt} failed: {conv[0]}")
                if time.monotonic() > deadline:
                    raise HarnessError(f"export conversion to {fmt} not completed: {snap}")
                time.sleep(0.5)
        return self.request("GET", f"/api/projects/{project_id}/exports/{eid}/download",
                            params={"exportType": fmt}).content


def unzip_json(data: bytes, name_endswith: str = ".json") -> Any:
    """The (first) JSON file inside a zip export such as COCO (``result.json``) or BRUSH_TO_COCO
    (``result_coco.json``)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for n in z.namelist():
            if n.endswith(name_endswith):
                return json.loads(z.read(n))
    raise ValueError("no JSON file in the zip")


def presign_url(task_id: int, fileuri: str) -> str:
    """The URL Label Studio uses to resolve cloud URIs: ``/tasks/<id>/presign/?fileuri=<b64>``."""
    b64 = base64.urlsafe_b64encode(fileuri.encode()).decode()
    return f"/tasks/{task_id}/presign/?fileuri={b64}"


# ----------------------------------------------------------------------------------------------
# a running Label Studio


class LabelStudio:
    """One headless Label Studio on 127.0.0.1 with its own fresh data dir.

    >>> ls = LabelStudio().start(legacy_tokens=False)
    >>> ls.api.create_project("demo", "<View>...</View>")   # authenticated client
    >>> ls.stop()
    """

    def __init__(self, venv: Path | str | None = None, *, username: str = DEFAULT_USERNAME,
                 password: str | None = None, token: str | None = None,
                 data_dir: Path | str | None = None, local_files_root: Path | str | None = None,
                 extra_env: Mapping[str, str] | None = None, use_template_db: bool = True):
        self.venv = Path(venv) if venv else None
        self.username = username
        self.password = password or "pw-" + secrets.token_hex(8)
        self.token = token or secrets.token_hex(20)  # LS wants > 5 chars; 40 hex like its own
        self._data_dir_arg = Path(data_dir) if data_dir else None
        self._local_files_root_arg = Path(local_files_root) if local_files_root else None
        self.extra_env = dict(extra_env or {})
        self.use_template_db = use_template_db
        self.data_dir: Path | None = None
        self.local_files_root: Path | None = None
        self.log_path: Path | None = None
        self.port: int | None = None
        self.url: str | None = None
        self.legacy_tokens: bool | None = None
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._created_data_dir = False
        self._api: LabelStudioClient | None = None
        self._pat: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        assert self.data_dir and self.port
        return _clean_env({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true" if self.legacy_tokens else "false",
            # what LS sends as "hostname" in /setup and uses for absolute URLs
            "LABEL_STUDIO_HOST": f"http://127.0.0.1:{self.port}",
            # a loopback ML backend needs both
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            # /data/local-files/?d=<path relative to the root> for local storage
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.local_files_root),
            **self.extra_env,
        })

    def start(self, port: int | None = None, legacy_tokens: bool = True,
              timeout: float | None = None) -> "LabelStudio":
        if self.process is not None:
            raise HarnessError("already started")
        if timeout is None:
            timeout = float(os.environ.get("SAM_BACKEND_LS_START_TIMEOUT", "180"))
        venv = self.venv = self.venv or ensure_label_studio_venv()
        self.legacy_tokens = legacy_tokens
        self.port = port or free_port()
        if port_in_use(self.port):
            # label-studio would silently move to the next free port
            raise HarnessError(f"port {self.port} is already in use")
        self.url = f"http://127.0.0.1:{self.port}"
        if self._data_dir_arg:
            self.data_dir = self._data_dir_arg
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="sam-backend-ls-"))
            self._created_data_dir = True
        self.local_files_root = self._local_files_root_arg or self.data_dir / "local-files"
        self.local_files_root.mkdir(parents=True, exist_ok=True)
        if self.use_template_db and not (self.data_dir / DB_FILE_NAME).exists():
            tpl = ensure_template_db(venv)
            if tpl:
                shutil.copy2(tpl, self.data_dir / DB_FILE_NAME)
        self.log_path = self.data_dir / "label-studio.log"
        cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser",
               "--internal-host", "127.0.0.1", "--port", str(self.port)]
        logger.info("starting Label Studio %s on %s (legacy tokens %s), data %s", LS_VERSION,
                    self.url, "on" if legacy_tokens else "off", self.data_dir)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env(),
                                            cwd=self.data_dir, start_new_session=True)
        try:
            self._wait_healthy(timeout, t0)
        except BaseException:
            self.stop(cleanup=False)
            raise
        self.startup_seconds = time.monotonic() - t0
        logger.info("Label Studio up at %s after %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_healthy(self, timeout: float, t0: float) -> None:
        assert self.process and self.log_path
        next_beat = t0 + 20
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise HarnessError(f"Label Studio exited with {rc} before /health answered; "
                                   f"log {self.log_path}:\n{tail(self.log_path)}")
            try:
                r = requests.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            now = time.monotonic()
            if now - t0 > timeout:
                raise HarnessError(f"Label Studio did not answer {self.url}/health within "
                                   f"{timeout:.0f} s; log {self.log_path}:\n{tail(self.log_path)}")
            if now >= next_beat:
                logger.info("waiting for Label Studio /health: %.0f s", now - t0)
                next_beat = now + 20
            time.sleep(0.3)

    def stop(self, cleanup: bool | None = None) -> None:
        """Terminate the process group; remove the data dir if this object created it (unless
        ``SAM_BACKEND_E2E_KEEP=1`` or ``cleanup=False``)."""
        if self.process is not None:
            _kill_group(self.process)
            logger.info("Label Studio at %s stopped", self.url)
            self.process = None
        if cleanup is None:
            cleanup = not os.environ.get("SAM_BACKEND_E2E_KEEP")
        if cleanup and self._created_data_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._created_data_dir = False

    def __enter__(self) -> "LabelStudio":
        return self if self.process else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines) if self.log_path else ""

    # -- auth -----------------------------------------------------------------------------------

    def legacy_client(self) -> LabelStudioClient:
        """Client with ``Authorization: Token <legacy token>`` (401 when legacy tokens are off)."""
        return LabelStudioClient(self.url, token=self.token)

    def session_client(self) -> LabelStudioClient:
        """Client logged in with username/password (cookie session), works in either mode."""
        return LabelStudioClient.login(self.url, self.username, self.password)

    def personal_access_token(self) -> str:
        """The admin's personal access token (created once per instance)."""
        if self._pat is None:
            maker = self.legacy_client() if self.legacy_tokens else self.session_client()
            self._pat = maker.get_personal_access_token()
        return self._pat

    def bearer_client(self) -> LabelStudioClient:
        return LabelStudioClient(self.url, personal_access_token=self.personal_access_token())

    @property
    def api(self) -> LabelStudioClient:
        """The default client: legacy token when enabled, else PAT-derived Bearer tokens."""
        if self._api is None:
            self._api = self.legacy_client() if self.legacy_tokens else self.bearer_client()
        return self._api

    def legacy_auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def bearer_auth_header(self) -> dict[str, str]:
        """A fresh access token from the PAT (``POST /api/token/refresh/``)."""
        access = LabelStudioClient(self.url).refresh_access_token(self.personal_access_token())
        return {"Authorization": f"Bearer {access}"}


# ----------------------------------------------------------------------------------------------
# any other HTTP service (the ML backend)


class BackendProcess:
    """Run ``cmd`` in its own process group; ready when ``GET http://127.0.0.1:<port>/health``
    answers 200. Output goes to ``log_path``; :meth:`restart` runs the same command again."""

    def __init__(self, cmd: Sequence[str], port: int, *, log_path: Path | str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
                 health_path: str = "/health", name: str = "backend"):
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ if env is None else env)
        self.cwd = str(cwd) if cwd else None
        self.health_path = health_path
        self.name = name
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self, timeout: float = 120.0) -> "BackendProcess":
        if self.process is not None:
            raise HarnessError(f"{self.name} already started")
        if port_in_use(self.port):
            raise HarnessError(f"port {self.port} is already in use; {self.name} not started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        logger.info("starting %s: %s (log %s)", self.name, shlex.join(self.cmd), self.log_path)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                            start_new_session=True)
        url = self.url + self.health_path
        last = "no answer"
        try:
            while True:
                rc = self.process.poll()
                if rc is not None:
                    raise HarnessError(f"{self.name} exited with {rc} before {url} answered 200; "
                                       f"log {self.log_path}:\n{tail(self.log_path)}")
                try:
                    r = requests.get(url, timeout=2)
                    if r.status_code == 200:
                        break
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                except requests.RequestException as exc:
                    last = type(exc).__name__
                if time.monotonic() - t0 > timeout:
                    raise HarnessError(f"{self.name}: {url} not 200 within {timeout:.0f} s (last: "
                                       f"{last}); log {self.log_path}:\n{tail(self.log_path)}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        logger.info("%s healthy at %s after %.1f s", self.name, self.url, self.startup_seconds)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _kill_group(self.process)
            logger.info("%s stopped", self.name)
            self.process = None

    def restart(self, timeout: float = 120.0) -> "BackendProcess":
        self.stop()
        deadline = time.monotonic() + 10
        while port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.start(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> "BackendProcess":
        return self if self.process else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------


def _main(argv: Iterable[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install the Label Studio venv (and template DB) if needed")
    sp = sub.add_parser("serve", help="start one Label Studio and wait for Ctrl-C")
    sp.add_argument("--port", type=int)
    sp.add_argument("--no-legacy-tokens", action="store_true")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "setup":
        print(ensure_label_studio_venv())
        return 0
    ls = LabelStudio().start(port=args.port, legacy_tokens=not args.no_legacy_tokens)
    try:
        print(json.dumps({"url": ls.url, "username": ls.username, "password": ls.password,
                          "legacy_token": ls.token, "legacy_tokens_enabled": ls.legacy_tokens,
                          "personal_access_token": ls.personal_access_token(),
                          "data_dir": str(ls.data_dir)}, indent=2), flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.is_set() and ls.running:
            stop.wait(1)
    except KeyboardInterrupt:
        pass
    finally:
        ls.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
