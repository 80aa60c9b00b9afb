"""`bash scripts/start.sh` passes the backend's exit status on: non-zero when it cannot start
(label-studio-ml 1.0.9's `start` drops it), 0 for a clean `--check`."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_utils import free_port

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
    stamp = hashlib.sha256((REPO / "constraints.txt").read_bytes()
                           + (REPO / "setup.py").read_bytes()).hexdigest()
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
