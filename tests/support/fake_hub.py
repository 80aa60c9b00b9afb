"""A model hub on a loopback port: the part of the hub's HTTP API that ``huggingface_hub``'s
``snapshot_download`` uses, serving the files of local directories as repositories.

Routes (huggingface_hub 2.4.0):
- ``GET /api/models/<owner>/<name>/revision/<rev>``: repository info (its commit ``sha``);
- ``GET /api/models/<owner>/<name>/tree/<commit>[/<path>]?recursive=...``: the file list;
- ``HEAD``/``GET /<owner>/<name>/resolve/<commit>/<file>``: a file's metadata (``X-Repo-Commit``,
  ``ETag``, size) and bytes.

A repository registered with ``gated=True`` answers every route with HTTP 403 and
``X-Error-Code: GatedRepo`` (what the hub answers for a gated repository without approved access)
unless the request carries ``Authorization: Bearer <token>`` with the token it was given.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.repos: Dict[str, Dict] = {}
        self.requests: List[str] = []
        self._server: Optional[ThreadingHTTPServer] = None

    def add_repo(self, repo_id: str, directory: Path, gated: bool = False,
                 token: Optional[str] = None) -> None:
        files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
                 if p.is_file()}
        self.repos[repo_id] = {"files": files, "gated": gated, "token": token}

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

            def _send(self, status: int, body: bytes = b"", headers: Optional[Dict] = None,
                      head: bool = False, length: Optional[int] = None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, status: int, value, headers=None, head=False):
                self._send(status, json.dumps(value).encode(),
                           {"Content-Type": "application/json", **(headers or {})}, head)

            def _answer(self, head: bool):
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = [p for p in path.split("/") if p]
                api = parts[:1] == ["api"]
                if api:
                    parts = parts[2:]  # api/models/
                repo_id = "/".join(parts[:2])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"},
                                      {"X-Error-Code": "RepoNotFound"}, head)
                if repo["gated"]:
                    auth = self.headers.get("Authorization", "")
                    if not repo["token"] or auth != f"Bearer {repo['token']}":
                        return self._json(
                            403, {"error": f"Access to model {repo_id} is restricted and you are "
                                           f"not in the authorized list."},
                            {"X-Error-Code": "GatedRepo",
                             "X-Error-Message": "Access to this model is restricted"}, head)
                rest = parts[2:]
                files = repo["files"]
                if api and rest[:1] == ["revision"]:
                    return self._json(200, {
                        "id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                        "gated": "manual" if repo["gated"] else False, "disabled": False,
                        "siblings": [{"rfilename": name} for name in files]}, head=head)
                if api and rest[:1] == ["tree"]:
                    return self._json(200, [
                        {"type": "file", "path": name, "size": p.stat().st_size,
                         "oid": _git_oid(p)} for name, p in files.items()], head=head)
                if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
                    name = "/".join(rest[2:])
                    target = files.get(name)
                    if target is None:
                        return self._json(404, {"error": "Entry not found"},
                                          {"X-Error-Code": "EntryNotFound"}, head)
                    data = target.read_bytes()
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"',
                                                  "Content-Type": "application/octet-stream"},
                                      head, len(data))
                return self._json(404, {"error": f"no route {path}"}, head=head)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _git_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
