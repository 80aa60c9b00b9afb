"""A real ``sam-backend serve`` for concept-prompt tests, watched for memory, and the payloads
that stress the typed-prompt path (configs with many labels, huge TextArea prompts)."""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from tests.support.server_utils import BackendProcess, free_port

MIB = 2 ** 20


def _rss_of(pid: int) -> int:
    """Resident bytes of one process (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _descendants(root: int) -> List[int]:
    """``root`` and every process below it, from the parent ids in /proc/<pid>/stat."""
    parents: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may hold spaces: the fields after its closing parenthesis
        fields = stat[stat.rfind(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    return sum(_rss_of(p) for p in _descendants(pid))


class MemoryWatch:
    """The largest resident size of a process tree, sampled every ``interval`` seconds in a
    thread, since the last :meth:`mark`."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.baseline = self.peak = tree_rss(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-watch", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.pid))

    def mark(self) -> int:
        """Start a new measurement: the baseline is the size now."""
        self.baseline = self.peak = tree_rss(self.pid)
        return self.baseline

    @property
    def growth(self) -> int:
        """Peak minus baseline, bytes."""
        return self.peak - self.baseline

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


@contextmanager
def serve_backend(options: List[str], log_dir: Path, env: Optional[Dict[str, str]] = None,
                  timeout: float = 300) -> Iterator[Tuple[object, MemoryWatch]]:
    """``sam-backend serve`` on a free loopback port with ``--with options``; yields the process
    (``.url``, ``.running``, ``.log_path``) and a :class:`MemoryWatch` on it; stopped after."""
    port = free_port()
    process = BackendProcess(
        [sys.executable, "-m", "sam_backend.cli", "serve", "--host", "127.0.0.1", "-p", str(port),
         "--with", *options], port, env or {}, Path(log_dir) / "backend.log")
    process.start(timeout=timeout)
    watch = MemoryWatch(process.process.pid)
    try:
        yield process, watch
    finally:
        watch.close()
        process.stop()


def many_labels_config(count: int, hints: bool = False) -> str:
    """A labeling config with a TextArea and ``count`` labels (``l0`` ...) in one BrushLabels on
    one image; with ``hints``, each label has a hint (``thing N``)."""
    labels = "".join(f'<Label value="l{i}" hint="thing {i}"/>' if hints
                     else f'<Label value="l{i}"/>' for i in range(count))
    return ('<View><Image name="image" value="$image"/>'
            '<TextArea name="phrase" toName="image" editable="true"/>'
            f'<BrushLabels name="brush" toName="image">{labels}</BrushLabels></View>')


def text_prompt(text, to_name="image") -> dict:
    """``params.context`` of a phrase typed into the TextArea, as Label Studio sends it."""
    return {"result": [{"type": "textarea", "from_name": "phrase", "to_name": to_name,
                        "origin": "manual", "value": {"text": [text]}}]}


def predict_body(image: str, config: str, context: dict) -> dict:
    return {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": config,
            "project": "1.1", "params": {"context": context}}
