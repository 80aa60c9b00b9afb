"""`bash scripts/start.sh` passes the backend's exit status on: non-zero when it cannot start
(label-studio-ml 1.0.9's `start` drops it), 0 for a clean `--check`."""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from tests.support.server_utils import BackendProcess, free_port

pytestmark = pytest.mark.process  # scripts/start.sh starts the backend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def venv(tmp_path):
    """A stand-in for the project's .venv that scripts/setup.sh finds up to date: its python runs
    this interpreter (so nothing is installed), its stamp matches constraints.txt + setup.py."""
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    python = root / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    # the stamp scripts/setup.sh writes: sha256 of constraints.txt, setup.py and itself
    stamp = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in
                                    ("constraints.txt", "setup.py", "scripts/setup.sh"))).hexdigest()
    (root / ".sam_backend-installed").write_text(stamp + "\n")
    return root


def start(venv, tmp_path, *args, env=None):
    full_env = dict(os.environ, SAM_BACKEND_VENV=str(venv),
                    SAM_BACKEND_IMAGE_CACHE_DIR=str(tmp_path / "imgcache"), **(env or {}))
    return subprocess.run(["bash", str(REPO / "scripts" / "start.sh"), "-p", str(free_port()),
                           "--host", "127.0.0.1", *args], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_start_exits_non_zero_when_the_backend_cannot_start(venv, tmp_path):
    weights = tmp_path / "empty-weights"
    weights.mkdir()
    done = start(venv, tmp_path, env={"SAM_BACKEND_WEIGHTS_DIR": str(weights),
                                      "SAM_BACKEND_OFFLINE": "1"})
    assert done.returncode != 0, done.stderr
    assert "mobile_sam.pt" in done.stderr and "offline" in done.stderr  # says what is missing
    assert "serving on" not in done.stderr


@pytest.mark.slow  # loads a model
def test_start_exits_zero_when_the_backend_starts(venv, tmp_path, checkpoint_factory):
    checkpoint = checkpoint_factory("mobile_sam")
    done = start(venv, tmp_path, "--check", "--with", f"sam_checkpoint_file={checkpoint}",
                 "runtime=torch")
    assert done.returncode == 0, done.stderr
    assert "model loaded" in done.stderr


class CountingMirror:
    """A loopback checkpoint mirror (``SAM_BACKEND_WEIGHTS_URL``) that answers 404 and records
    every path asked for: a start that downloads shows up here."""

    def __init__(self):
        self.requests = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                self.send_error(404)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def fresh_checkout(dest: Path) -> Path:
    """What a clone holds (the code, the scripts, an empty ``weights/``), without this tree's
    checkpoints or venv."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sam", "sam_backend", "scripts", "xml_templates"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("setup.py", "constraints.txt", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    (dest / "weights").mkdir()
    return dest


@pytest.mark.slow  # loads a model
def test_a_checkpoint_copied_into_weights_is_served_without_a_download(venv, tmp_path,
                                                                          checkpoint_factory):
    """The README's path, literally: a fresh clone, ``mobile_sam.pt`` copied into its
    ``weights/`` by hand, ``bash scripts/start.sh``: the backend serves that file and asks no
    mirror for anything."""
    clone = fresh_checkout(tmp_path / "clone")
    shutil.copy2(checkpoint_factory("mobile_sam"), clone / "weights" / "mobile_sam.pt")
    mirror = CountingMirror()
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAM_BACKEND_WEIGHTS_DIR", "SAM_BACKEND_OFFLINE", "OFFLINE")}
    env.update(SAM_BACKEND_VENV=str(venv), SAM_BACKEND_WEIGHTS_URL=mirror.url,
               SAM_BACKEND_IMAGE_CACHE_DIR=str(tmp_path / "imgcache"))
    port = free_port()
    backend = BackendProcess(["bash", str(clone / "scripts" / "start.sh"), "-p", str(port),
                              "--host", "127.0.0.1"], port, env, tmp_path / "start.log")
    # exactly this environment (no SAM_BACKEND_WEIGHTS_DIR of the caller's), from the clone
    backend.env, backend.cwd = env, str(clone)
    try:
        backend.start(timeout=300)
        health = requests.get(backend.url + "/health", timeout=5).json()
    finally:
        backend.stop()
        mirror.close()
    assert health["model"] == "mobile_sam/vit_t"
    assert mirror.requests == [], mirror.requests


def test_without_the_file_the_message_points_at_the_clone_weights(venv, tmp_path):
    """The same clone without the file, offline: the error names ``<clone>/weights/mobile_sam.pt``
    (where the README says to put it), not a directory inside the package."""
    clone = fresh_checkout(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k != "SAM_BACKEND_WEIGHTS_DIR"}
    env.update(SAM_BACKEND_VENV=str(venv), SAM_BACKEND_OFFLINE="1",
               SAM_BACKEND_IMAGE_CACHE_DIR=str(tmp_path / "imgcache"))
    done = subprocess.run(["bash", str(clone / "scripts" / "start.sh"), "-p", str(free_port()),
                           "--host", "127.0.0.1"], env=env, cwd=clone, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(clone / "weights" / "mobile_sam.pt") in done.stderr, done.stderr[-2000:]
    assert "sam_backend/weights" not in done.stderr
