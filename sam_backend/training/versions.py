"""Trained versions on disk: where each run's model and report live, which one a project serves,
and the switch between them (atomic, so every replica sees the old version or the new one).

Layout under the trained directory (``trained_dir``, default ``<weights directory>/trained``; a
shared volume for a team)::

    project-<id>/v<N>/model/...        the trainer's directory (weights + MODEL_FILE)
    project-<id>/v<N>/report.json      the run's report (:mod:`.report`)
    project-<id>/v<N>/report.png       the chart a person looks at
    project-<id>/v<N>/MANIFEST.json    sha256 + size of every other file of v<N>, written last
    project-<id>/current               "v<N>\\n": the served version (replaced with os.replace)
    project-<id>/history.jsonl         one line per promotion / rollback
    project-<id>/status.json           the run status (written atomically by the run)
    project-<id>/.work-*/              a run's work directory (never listed, never loaded)

**Nothing half-written is ever loaded.** A run writes everything into its ``.work-*`` directory;
:meth:`VersionStore.publish` writes the manifest last and then renames the directory to the next
``v<N>`` in one ``rename`` (a reader sees no ``v<N>`` or a complete one). A ``v<N>`` without a
manifest is not a version (:meth:`VersionStore.versions` skips it), and
:meth:`VersionStore.load_detector` checks every file against the manifest before loading
(:class:`CorruptVersion` with what is wrong and what to do). Old versions are kept; the
pointer ``current`` moves (:meth:`~VersionStore.promote`, :meth:`~VersionStore.rollback`).

**Rollback** without a target goes back to the version served before the current one: the
history is read as a stack of served versions (a promotion pushes, a rollback pops the version
rolled back from), so two rollbacks after v1, v2, v3 serve v1.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sam_backend.common.files import atomic_write, file_lock, sha256_of
from sam_backend.training.base import Detector, TrainOptions, trainer_for

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
POINTER = "current"
HISTORY = "history.jsonl"
STATUS = "status.json"
WORK_PREFIX = ".work-"
_VERSION_RE = re.compile(r"^v(\d+)$")


class CorruptVersion(ValueError):
    """A version that must not be loaded (incomplete, damaged, or unreadable); the message says
    which file and what to do."""


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Version:
    """One complete trained version of a project: ``path`` is its ``v<N>`` directory; ``kind``
    the trainer that made it (``rf_detr``, ``grounding_dino``)."""

    project: int
    number: int
    kind: str
    path: Path
    _report: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"p{self.project}-v{self.number}"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def report(self) -> dict:
        """Its report.json (read once; {} when unreadable)."""
        if self._report is None:
            try:
                self._report = json.loads((self.path / REPORT_JSON).read_text())
            except (OSError, ValueError):
                self._report = {}
        return self._report


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def file_checksums(directory: Path, skip: Tuple[str, ...] = ()) -> Dict[str, Dict[str, Any]]:
    """``{relative posix path: {"sha256", "size"}}`` of every file under ``directory`` (sorted),
    leaving out the top-level names in ``skip``."""
    out: Dict[str, Dict[str, Any]] = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in skip:
            continue
        out[rel] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    return out


class VersionStore:
    """The trained versions of every project under ``root`` (see the module docstring). Safe to
    use from several threads and processes (promotions and publications take a file lock in the
    project's directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings) -> "VersionStore":
        """``settings.trained_dir``, default ``<weights directory>/trained``."""
        if settings.trained_dir:
            return cls(Path(settings.trained_dir).expanduser())
        from sam_backend.models.registry import weights_dir

        return cls(weights_dir() / "trained")

    # -- paths --------------------------------------------------------------------------------
    def project_dir(self, project: int) -> Path:
        return self.root / f"project-{int(project)}"

    def _lock(self, project: int):
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        return file_lock(directory / ".versions.lock")

    def run_lock_path(self, project: int) -> Path:
        """The lock file a run holds for its whole duration (one run per project at a time on
        this machine, or on machines sharing the volume)."""
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / ".run.lock"

    def _version(self, project: int, number: int) -> Optional[Version]:
        path = self.project_dir(project) / f"v{number}"
        manifest = _read_json(path / MANIFEST)
        if not isinstance(manifest, dict):
            return None
        return Version(int(project), int(number), str(manifest.get("kind") or ""), path)

    def version(self, project: int, number: int) -> Version:
        """Version ``number`` of ``project``; CorruptVersion when it does not exist or is
        incomplete."""
        found = self._version(project, number)
        if found is None:
            path = self.project_dir(project) / f"v{number}"
            what = "does not exist" if not path.exists() else f"is incomplete (no {MANIFEST})"
            known = ", ".join(v.name for v in self.versions(project)) or "none"
            raise CorruptVersion(f"version p{project}-v{number} ({path}) {what}; the project's "
                                 f"versions: {known}")
        return found

    # -- reading --------------------------------------------------------------------------------
    def current(self, project: int) -> Optional[Version]:
        """The served version (the pointer ``current``), None when there is none. A pointer to
        a version that is missing or incomplete serves nothing (logged)."""
        pointer = self.project_dir(project) / POINTER
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s cannot be read: %s", pointer, exc)
            return None
        match = _VERSION_RE.match(text)
        if not match:
            log.warning("%s holds %r, not v<N>: project %s serves no trained version", pointer,
                        text[:40], project)
            return None
        found = self._version(project, int(match.group(1)))
        if found is None:
            log.warning("%s names %s, which is missing or incomplete: project %s serves no "
                        "trained version", pointer, text, project)
        return found

    def pointer_stamp(self, project: int) -> Optional[tuple]:
        """``(st_mtime_ns, st_ino, st_size)`` of the pointer, None when absent: changes whenever
        the pointer is replaced (replicas poll it)."""
        try:
            st = os.stat(self.project_dir(project) / POINTER)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def versions(self, project: int) -> List[Version]:
        """The complete versions, oldest first (work directories and incomplete ``v<N>`` are
        never listed)."""
        directory = self.project_dir(project)
        if not directory.is_dir():
            return []
        numbers = sorted(int(m.group(1)) for m in (_VERSION_RE.match(p.name)
                                                    for p in directory.iterdir()) if m)
        return [v for v in (self._version(project, n) for n in numbers) if v is not None]

    def projects(self) -> List[int]:
        """Projects that have a directory here."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = re.match(r"^project-(\d+)$", path.name)
            if match and path.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    # -- writing ------------------------------------------------------------------------------
    def work_dir(self, project: int) -> Path:
        """A fresh, empty ``.work-*`` directory in the project's directory (same file system as
        the versions, so publishing is one rename)."""
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=directory))

    def clean_work_dirs(self, project: int, keep: Optional[Path] = None) -> List[str]:
        """Remove the work directories left by runs that died (call it holding the run lock:
        no other run is writing one). Returns their names."""
        directory = self.project_dir(project)
        removed = []
        if directory.is_dir():
            for path in directory.iterdir():
                if path.name.startswith(WORK_PREFIX) and path.is_dir() and \
                        (keep is None or path.resolve() != Path(keep).resolve()):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
        if removed:
            log.info("project %s: removed %d work directories of runs that did not finish",
                     project, len(removed))
        return removed

    def publish(self, project: int, work_dir: Path, kind: str, report: Dict[str, Any],
                before_manifest=None) -> Version:
        """Make ``work_dir`` (holding ``model/`` and anything else the run wrote) the next
        version: its number and name go into ``report`` (``version``, and ``checksums`` of the
        model's files), ``report.json`` is written, then ``before_manifest(work_dir, report)``
        when given (e.g. drawing ``report.png``, which shows the version's name), then
        ``MANIFEST.json`` (sha256 and size of every file), then one rename to ``v<N>``. Not
        promoted: see :meth:`promote`."""
        from sam_backend.training.report import write_report_json

        work_dir = Path(work_dir)
        if not (work_dir / "model").is_dir():
            raise ValueError(f"{work_dir} has no model/ directory: nothing to publish")
        with self._lock(project):
            directory = self.project_dir(project)
            taken = [int(m.group(1)) for m in (_VERSION_RE.match(p.name)
                                                for p in directory.iterdir()) if m]
            number = max(taken, default=0) + 1
            name = f"p{project}-v{number}"
            report["version"] = name
            report["project"] = int(project)
            report["kind"] = kind
            report["checksums"] = {f"model/{k}": v["sha256"]
                                   for k, v in file_checksums(work_dir / "model").items()}
            write_report_json(work_dir / REPORT_JSON, report)
            if before_manifest is not None:
                before_manifest(work_dir, report)
            manifest = {"project": int(project), "version": name, "number": number,
                        "kind": kind, "created": now_iso(), "host": socket.gethostname(),
                        "files": file_checksums(work_dir, skip=(MANIFEST,))}
            path = work_dir / MANIFEST
            with open(path, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(work_dir, directory / f"v{number}")
        log.info("project %s: published %s (%s)", project, name, kind)
        return Version(int(project), number, kind, directory / f"v{number}", report)

    def _history(self, project: int) -> List[dict]:
        path = self.project_dir(project) / HISTORY
        entries = []
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line of a crashed writer
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def history(self, project: int) -> List[dict]:
        """The promotions and rollbacks, oldest first."""
        return self._history(project)

    def _served_stack(self, project: int) -> List[int]:
        """Version numbers served, most recent last (promotion pushes; a rollback pops the
        version rolled back from and pushes its target)."""
        stack: List[int] = []
        for entry in self._history(project):
            number = entry.get("number")
            if not isinstance(number, int):
                continue
            if entry.get("action") == "rollback":
                previous = entry.get("previous_number")
                if isinstance(previous, int) and previous in stack:
                    stack.remove(previous)
            if number in stack:
                stack.remove(number)
            stack.append(number)
        return stack

    def _switch(self, project: int, version: Version, action: str, reason: str) -> None:
        current = self.current(project)
        directory = self.project_dir(project)
        atomic_write(directory / POINTER, f"v{version.number}\n")
        entry = {"time": now_iso(), "action": action, "version": version.name,
                 "number": version.number, "kind": version.kind, "reason": reason,
                 "previous": current.name if current else None,
                 "previous_number": current.number if current else None}
        with open(directory / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        log.info("project %s: %s %s (was %s): %s", project, action, version.name,
                 entry["previous"] or "no trained version", reason)

    def promote(self, project: int, version: Version, reason: str) -> Version:
        """Serve ``version`` (the pointer replaced atomically, a history line appended)."""
        with self._lock(project):
            if self._version(project, version.number) is None:
                raise CorruptVersion(f"{version.name} is not a complete version: not promoted")
            self._switch(project, version, "promote", reason)
        return version

    def rollback(self, project: int, to: Optional[int] = None) -> Version:
        """Serve version ``to``, or (None) the version served before the current one. The target
        is verified first; CorruptVersion (a ValueError) when there is none or it is damaged."""
        with self._lock(project):
            current = self.current(project)
            if to is None:
                stack = self._served_stack(project)
                if current is not None and current.number in stack:
                    stack.remove(current.number)
                candidates = [n for n in reversed(stack)
                              if self._version(project, n) is not None]
                if not candidates:
                    raise CorruptVersion(
                        f"project {project} has no earlier served version to roll back to "
                        f"(served now: {current.name if current else 'none'}); name one with "
                        f"--to N")
                to = candidates[0]
            target = self.version(project, int(to))
            if current is not None and current.number == target.number:
                raise CorruptVersion(f"project {project} already serves {target.name}")
            self.verify(target)
            self._switch(project, target, "rollback",
                         f"rolled back from {current.name if current else 'none'}")
        return target

    # -- checking and loading -----------------------------------------------------------------
    def verify(self, version: Version) -> None:
        """Every file the manifest lists is there with its size and sha256; CorruptVersion
        naming the first that is not (and what to do) otherwise."""
        manifest = _read_json(version.path / MANIFEST)
        advice = (f"roll back (sam-backend train --project {version.project} --rollback) or "
                  f"train again")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CorruptVersion(f"version {version.name} ({version.path}) is incomplete: its "
                                 f"{MANIFEST} is missing or unreadable (a run that did not "
                                 f"finish); {advice}")
        files = manifest["files"]
        if not any(name.startswith("model/") for name in files):
            raise CorruptVersion(f"version {version.name} ({version.path}) lists no model "
                                 f"files; {advice}")
        for name, expected in sorted(files.items()):
            path = version.path / name
            try:
                size = path.stat().st_size
            except OSError:
                raise CorruptVersion(f"version {version.name}: {name} is missing "
                                     f"({version.path}); {advice}") from None
            if size != expected.get("size"):
                raise CorruptVersion(
                    f"version {version.name}: {name} has {size:,} bytes, the manifest says "
                    f"{expected.get('size'):,} (a damaged or half-copied file); {advice}")
            if sha256_of(path) != expected.get("sha256"):
                raise CorruptVersion(f"version {version.name}: {name} does not match its "
                                     f"checksum (a damaged file); {advice}")

    def load_detector(self, version: Version, device: str = "cpu") -> Detector:
        """The version's model for inference: verified, then loaded by its trainer."""
        self.verify(version)
        try:
            trainer = trainer_for(version.kind, TrainOptions(device=device))
            return trainer.load(version.model_dir, device)
        except ValueError as exc:
            raise CorruptVersion(f"version {version.name} cannot be loaded: {exc}") from None

    # -- run status -----------------------------------------------------------------------------
    def status(self, project: int) -> dict:
        """The last status a run wrote ({} when none)."""
        found = _read_json(self.project_dir(project) / STATUS)
        return found if isinstance(found, dict) else {}

    def write_status(self, project: int, status: dict) -> None:
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / STATUS, json.dumps(status, sort_keys=True, default=str))


__all__ = ["CorruptVersion", "MANIFEST", "Version", "VersionStore", "file_checksums"]
