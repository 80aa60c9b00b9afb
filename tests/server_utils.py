"""Start the backend as a real process on a loopback port, the way users start it."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from e2e.ls_harness import BackendProcess as _Process
from e2e.ls_harness import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent


def BackendProcess(cmd: List[str], port: int, env: Optional[Dict[str, str]] = None,
                   log_path: Optional[Path] = None) -> _Process:
    """``cmd`` run from the repo root with this interpreter's bin directory first on PATH
    (label-studio-ml starts ``python sam/_wsgi.py``), its output in ``log_path``."""
    full_env = dict(os.environ)
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    return _Process(cmd, port, log_path=log_path, env=full_env, cwd=REPO, name="sam-backend")
