"""Start the backend as a real process on a loopback port, the way users start it."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from tests.support.ls_harness import BackendProcess as _Process
from tests.support.ls_harness import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]


def BackendProcess(cmd: List[str], port: int, env: Optional[Dict[str, str]] = None,
                   log_path: Optional[Path] = None) -> _Process:
    """``cmd`` run from the repo root with this interpreter's bin directory first on PATH
    (label-studio-ml starts ``python sam/_wsgi.py``), its output in ``log_path``."""
    full_env = dict(os.environ)
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    full_env.update(env or {})
    return _Process(cmd, port, log_path=log_path, env=full_env, cwd=REPO, name="sam-backend")


def run_together(call: Callable[[int], Any], count: int, timeout: float, barrier_timeout: float
                 ) -> Tuple[List[Any], List[BaseException]]:
    """``call(0) .. call(count - 1)`` in ``count`` threads released at once by a barrier
    (waited for at most ``barrier_timeout`` seconds); returns
    their results (None where a call failed) and the exceptions raised, each thread joined within
    ``timeout`` seconds."""
    barrier = threading.Barrier(count)
    results: List[Any] = [None] * count
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(barrier_timeout)
            results[i] = call(i)
        except Exception as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results, errors
