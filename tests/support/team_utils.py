"""A team deployment on loopback for tests: Redis, backend replicas (`sam-backend serve`), RQ
workers (`sam-backend worker`), and a small Label Studio API stand-in for `precompute`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

from tests.support.server_utils import REPO, BackendProcess, free_port

CLI = [sys.executable, "-m", "sam_backend.cli"]
API_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def model_options(checkpoint, store_url: str, *extra: str) -> List[str]:
    return ["model_name=mobile_sam", f"sam_checkpoint_file={checkpoint}", "device=cpu",
            "runtime=torch", "embedding_dtype=float32", f"embedding_store={store_url}", *extra]


def process_env(docroot: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(docroot), "PYTHONUNBUFFERED": "1",
           "SAM_BACKEND_IMAGE_CACHE_BYTES": "0", "OMP_NUM_THREADS": "2"}
    env.update(extra or {})
    return env


def start_replica(options: List[str], env: Dict[str, str], log_path: Path) -> BackendProcess:
    port = free_port()
    process = BackendProcess(CLI + ["serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--threads", "8", "--with", *options], port, env, log_path)
    return process.start(timeout=300)


class WorkerProcess:
    """`sam-backend worker` in its own process group; ready once RQ registered it in Redis."""

    def __init__(self, options: List[str], env: Dict[str, str], log_path: Path, redis_client,
                 maintenance_interval: int = 2, name: Optional[str] = None):
        self.name = name or f"w{free_port()}"
        self.cmd = CLI + ["worker", "--name", self.name, "--maintenance-interval",
                          str(maintenance_interval), "--with", *options]
        self.env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep +
                        os.environ.get("PATH", ""), **env)
        self.log_path = Path(log_path)
        self.redis = redis_client
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 300) -> "WorkerProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env, cwd=REPO,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.redis.exists(f"rq:worker:{self.name}"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker did not start: {self.log()[-3000:]}")
            time.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def encoded(self) -> List[str]:
        """Image keys this worker encoded, in order (its log lines)."""
        return re.findall(r"encoded (\S+) in ", self.log())

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker dies the way a lost machine does."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
            self.process = None

    stop = kill


class FakeLabelStudioAPI:
    """The API calls `sam-backend precompute` and `sam-backend annotate` make, on a loopback
    port: ``GET /api/projects/<id>``, ``GET /api/tasks?project=&page=&page_size=`` (Label
    Studio's shapes: ``{"tasks": [...], "total": n}``; 404 past the last page; a task's
    annotations, drafts and predictions only with ``fields=all``), and
    ``GET``/``POST /api/predictions`` (kept in ``predictions``), legacy token auth."""

    def __init__(self, label_config: str, tasks: List[dict], project: int = 1):
        self.label_config, self.tasks, self.project = label_config, tasks, project
        self.requests: List[str] = []
        self.predictions: List[dict] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def unauthorized(self) -> bool:
                if self.headers.get("Authorization") == f"Token {API_TOKEN}":
                    return False
                self.reply(401, {"detail": "Authentication credentials were not provided."})
                return True

            def do_GET(self):
                state.requests.append(self.path)
                if self.unauthorized():
                    return
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                if parts.path == f"/api/projects/{state.project}":
                    return self.reply(200, {"id": state.project,
                                            "label_config": state.label_config})
                if parts.path == "/api/tasks" and query.get("project") == str(state.project):
                    page, size = int(query.get("page", 1)), int(query.get("page_size", 30))
                    chunk = state.tasks[(page - 1) * size:page * size]
                    if query.get("fields") != "all":  # as Label Studio: no annotations unasked
                        chunk = [{k: v for k, v in t.items()
                                  if k not in ("annotations", "drafts", "predictions")}
                                 for t in chunk]
                    if not chunk and page > 1:
                        return self.reply(404, {"detail": "Invalid page."})
                    return self.reply(200, {"tasks": chunk, "total": len(state.tasks)})
                if parts.path == "/api/predictions" and query.get("project") == str(state.project):
                    return self.reply(200, state.predictions)
                self.reply(404, {"detail": "Not found."})

            def do_POST(self):
                state.requests.append(f"POST {self.path}")
                if self.unauthorized():
                    return
                if urlsplit(self.path).path != "/api/predictions":
                    return self.reply(404, {"detail": "Not found."})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                state.predictions.append({"id": len(state.predictions) + 1, **body})
                self.reply(201, state.predictions[-1])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
