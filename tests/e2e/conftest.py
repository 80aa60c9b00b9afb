"""Fixtures for end-to-end tests against a real Label Studio 1.23.2 (see README.md here).

- ``ls_venv``: the cached Label Studio venv (installed on first use, ~2 min).
- ``label_studio``: a session-wide instance with legacy tokens on (``ls.api`` uses ``Token``).
- ``label_studio_no_legacy``: a session-wide instance with legacy tokens off (``ls.api`` uses a
  Bearer token derived from the admin's personal access token).
- ``label_studio_factory``: ``label_studio_factory(legacy_tokens=..., **LabelStudio kwargs)`` for
  more instances; all are stopped at the end of the session.
- ``backend_process`` / ``session_backend_process``: factories
  ``backend_process(cmd, port, env=None, cwd=None, timeout=120, name="backend")`` that start any
  command (the ML backend), wait for ``GET http://127.0.0.1:<port>/health`` == 200 and stop its
  process group at teardown (function / session scope). The log goes to a file; its tail is
  printed when the owning test fails.

Every test collected under this directory gets the ``e2e`` and ``process`` markers. Set ``SAM_BACKEND_SKIP_E2E=1``
to skip them all (e.g. for a quick unit-test run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

from tests.support import ls_harness
from tests.support.ls_harness import BackendProcess, LabelStudio, free_port  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test against a real Label Studio 1.23.2 (installs it on first use)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="SAM_BACKEND_SKIP_E2E is set")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.process)  # Label Studio and the backend run as processes
            if os.environ.get("SAM_BACKEND_SKIP_E2E"):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"_e2e_rep_{rep.when}", rep)


def _test_failed(request: pytest.FixtureRequest) -> bool:
    if request.scope == "session" or request.node is request.session:
        return request.session.testsfailed > 0
    return any(getattr(getattr(request.node, f"_e2e_rep_{w}", None), "failed", False)
               for w in ("setup", "call"))


def _print_tail(title: str, text: str) -> None:
    sys.stderr.write(f"\n===== {title} (tail) =====\n{text}\n===== end of {title} =====\n")


# ---------------------------------------------------------------------------------------------
# Label Studio


@pytest.fixture(scope="session")
def ls_venv() -> Path:
    return ls_harness.ensure_label_studio_venv()


@pytest.fixture(scope="session")
def label_studio_factory(ls_venv, tmp_path_factory, request):
    started: list[LabelStudio] = []

    def make(legacy_tokens: bool = True, port: int | None = None, **kwargs) -> LabelStudio:
        kwargs.setdefault("data_dir", tmp_path_factory.mktemp("label-studio"))
        ls = LabelStudio(ls_venv, **kwargs)
        started.append(ls)
        return ls.start(port=port, legacy_tokens=legacy_tokens)

    yield make
    for ls in started:
        if _test_failed(request) and ls.log_path:
            _print_tail(f"Label Studio log {ls.log_path}", ls.log_tail())
        ls.stop()


@pytest.fixture(scope="session")
def label_studio(label_studio_factory) -> LabelStudio:
    """Label Studio with legacy API tokens enabled; ``label_studio.api`` uses ``Token``."""
    return label_studio_factory(legacy_tokens=True)


@pytest.fixture(scope="session")
def label_studio_no_legacy(label_studio_factory) -> LabelStudio:
    """Label Studio with legacy API tokens disabled (the 1.23 default); ``.api`` uses Bearer."""
    return label_studio_factory(legacy_tokens=False)


# ---------------------------------------------------------------------------------------------
# the backend (any command serving GET /health)


def _backend_factory(request, tmp_path_factory):
    started: list[BackendProcess] = []

    def start(cmd, port: int, *, env=None, cwd=None, timeout: float = 120.0,
              name: str = "backend", health_path: str = "/health") -> BackendProcess:
        log_dir = tmp_path_factory.mktemp(f"{name}-log")
        proc = BackendProcess(cmd, port, log_path=log_dir / f"{name}.log", env=env, cwd=cwd,
                              name=name, health_path=health_path)
        started.append(proc)
        return proc.start(timeout=timeout)

    return start, started


def _stop_backends(request, started) -> None:
    failed = _test_failed(request)
    for proc in started:
        if failed:
            _print_tail(f"{proc.name} log {proc.log_path}", proc.log_tail())
        proc.stop()


@pytest.fixture
def backend_process(request, tmp_path_factory):
    """Factory: ``backend_process(cmd, port, env=None, cwd=None, timeout=120)`` ->
    :class:`ls_harness.BackendProcess` (healthy); stopped when the test ends."""
    start, started = _backend_factory(request, tmp_path_factory)
    yield start
    _stop_backends(request, started)


@pytest.fixture(scope="module")
def session_backend_process(request, tmp_path_factory):
    """Same as ``backend_process`` but the processes live for the whole test module (not the
    session: a full-size SAM 3 backend holds ~3 GB, which the rest of the suite needs)."""
    start, started = _backend_factory(request, tmp_path_factory)
    yield start
    _stop_backends(request, started)
