"""End-to-end click latency over HTTP against a real backend process (the project's click-latency targets).

Usage:
    python benchmarks/bench_http.py [--variants mobile_sam,sam_hq/vit_tiny,sam/vit_b]
                                    [--runtimes torch,onnx] [--repeats 5] [--embedded-repeats 15]
                                    [--cache-dir DIR] [--out benchmarks/results/http.json]

For every variant (random-weight checkpoint) and runtime, the backend is started the production
way, ``sam-backend serve`` (waitress, one process, 8 threads), on a loopback port,
with ``device=cpu runtime=<runtime> out_poly=true`` and every other option at its default
(float16 embedding cache of 1024 MiB, precompute on). Images are JPEG files served the way Label
Studio's local storage does: ``/data/local-files/?d=<path>`` with ``LOCAL_FILES_DOCUMENT_ROOT``.
Requests are Label Studio's own /predict payloads; each time is
the wall time of one ``POST /predict`` on a keep-alive connection, request sent to response body
read. After a warm-up (a first click, a few clicks and a 3-point sequence on a warm-up image, the
first clicks on the 1080p and 4K images used below), measured in this order:

1. ``embedded_click_1080p``: single positive clicks at different points on an embedded 1920x1080
   image (brush + box answered: the label config has no polygon control);
   ``embedded_click_1080p_3pt``: the 3rd request of positive/negative/positive sequences (Label
   Studio re-sends all of an object's points, so it carries 3 points and the previous mask);
   ``embedded_click_1080p_poly``: the single clicks again with a PolygonLabels control too.
2. ``embedded_click_4k_poly``: clicks on an embedded 3840x2160 image, brush + polygons + box.
3. ``first_click_1080p``: one click on an image this process has never seen (distinct images).
4. ``precompute_click_1080p``: a /predict without context (task opened: ``task_open_1080p``),
   1.5 s of waiting, then a click on that image. Control: ``embedded_click_after_idle_1080p``,
   a click on the embedded image after 1.5 s of idling (what precompute can at best achieve:
   an idle process answers its first click after a pause more slowly than back-to-back clicks).
5. ``busy_click_1080p``: a first click on a new image is fired from another thread; 100 ms later
   a click on the embedded 1080p image is timed (``busy_background_first_click`` is the other
   request's time). Its ratio to the idle ``embedded_click_1080p`` median is reported.
6. Process memory (VmRSS / VmHWM of the server process, which holds the model) and the
   embedding cache (GET /health) divided by its image count.
7. ``reencode_click_1080p``: the single clicks of 1. on the same backend started with
   ``embedding_cache_mb=1``: an embedding (2 MiB in float16 for MobileSAM) does not fit, so every
   click re-encodes the image, as backends without an embedding cache do. Ratio to 1.

The server logs ``predict: N result(s) in X ms`` for every request; its median is reported as
``server_median_ms`` next to the client-side time (the rest is HTTP and JSON).

A runtime that fails to start (or falls back to another runtime) gets an
``unavailable: <reason>`` row; the other runtimes still run. Writes a Markdown table to stdout
and JSON to ``--out``; machine (cores, CPU model, load average before/after) and versions
included. Targets are judged per variant (``VARIANT_TARGETS``): MobileSAM's, SAM 2.1
hiera_tiny's (``--variants sam2/hiera_tiny``: embedded click <= 80 ms, first click <= 3 s at
1080p) and SAM 3's (an embedded 1080p click <= 300 ms); for other variants MobileSAM's are shown
but not judged. SAM 3's encoder takes a minute or more per image on a 2-core CPU, so it gets a
light plan (``LIGHT_VARIANTS``): the first click on the embedded image and ``--repeats - 1`` new
images, then phase 1 only:

    python benchmarks/bench_http.py --variants sam3 --runtimes torch --repeats 2 \
        --weights-dir DIR_WITH_sam3 --out benchmarks/results/http_sam3.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CACHE_DIR = Path(os.environ.get("SAM_BACKEND_BENCH_DIR",
                                        Path.home() / ".cache" / "sam_backend" / "bench-http"))
CHECKPOINT_SEED = 0
IMAGE_TAG = "v1"  # bump when the way images are drawn changes
PRECOMPUTE_WAIT_S = 1.5
BUSY_DELAY_S = 0.1
P95_MIN_SAMPLES = 10

CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="KeyPointLabels" toName="image" smart="true">
    <Label value="object" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="RectangleLabels" toName="image" smart="true"><Label value="object"/></RectangleLabels>
  <BrushLabels name="BrushLabels" toName="image"><Label value="object"/></BrushLabels>{poly}
</View>"""
CONFIG_BRUSH_BOX = CONFIG.format(poly="")
CONFIG_WITH_POLY = CONFIG.format(
    poly='\n  <PolygonLabels name="PolygonLabels" toName="image"><Label value="object"/></PolygonLabels>')

# Issue 6's targets (MobileSAM, 2-core CPU, 1920x1080 JPEG, HTTP end to end, warm process, medians)
TARGETS = [
    ("embedded click, 1080p", "embedded_click_1080p", "ms", 60.0),
    ("first click on a new image, 1080p", "first_click_1080p", "ms", 1000.0),
    ("click 1.5 s after the task was opened (precompute) = an embedded click",
     "precompute_click_1080p", "ms", 60.0),
    ("embedded click, 3840x2160 (brush + polygons + box)", "embedded_click_4k_poly", "ms", 120.0),
    ("embedded click while another image is encoding, x its idle time", "busy_over_idle", "x", 3.0),
]
# Variants whose image encoder takes a minute or more per image on this CPU (SAM 3: ~80 s) get a
# light plan: the 1080p embedded-click measurements and --repeats first clicks; no 4K image,
# precompute, busy or re-encoding phases (each of their samples is another encoder run).
LIGHT_VARIANTS = {"sam3/default"}
# Issue 13's targets for SAM 2.1 hiera_tiny (same machine class, medians)
SAM2_TARGETS = [
    ("embedded click, 1080p", "embedded_click_1080p", "ms", 80.0),
    ("first click on a new image, 1080p", "first_click_1080p", "ms", 3000.0),
]
# Issue 13's target for SAM 3 (its first click is reported: the encoder is the cost).
SAM3_TARGETS = [("embedded click, 1080p", "embedded_click_1080p", "ms", 300.0)]
VARIANT_TARGETS = {"mobile_sam/vit_t": TARGETS, "sam2/hiera_tiny": SAM2_TARGETS,
                   "sam3/default": SAM3_TARGETS}


# -- machine -------------------------------------------------------------------------------------
def machine_info() -> Dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu_model": cpu_model,
            "mem_total_bytes": mem_total, "platform": platform.platform(),
            "python": platform.python_version(), "hostname": platform.node()}


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for name in ("sam_backend", "torch", "torchvision", "onnxruntime", "onnx", "numpy",
                 "opencv-python-headless", "opencv-python", "waitress", "flask", "timm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def loadavg() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def proc_status(pid: int) -> Dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes."""
    out: Dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def cpu_busy_seconds() -> Optional[float]:
    """CPU seconds spent busy by the whole machine (all cores) since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    try:
        after = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuShare:
    """How many cores the server, this client and everything else used over a time window."""

    def __init__(self, server_pids: Sequence[int]):
        self.pids = list(server_pids)
        self.wall = time.perf_counter()
        self.machine = cpu_busy_seconds()
        self.server = sum(process_cpu_seconds(p) for p in self.pids)
        times = os.times()
        self.client = times.user + times.system

    def result(self) -> Dict[str, Optional[float]]:
        wall = time.perf_counter() - self.wall
        machine = cpu_busy_seconds()
        server = sum(process_cpu_seconds(p) for p in self.pids) - self.server
        times = os.times()
        client = times.user + times.system - self.client
        if machine is None or self.machine is None or wall <= 0:
            return {"seconds": round(wall, 1), "server_cores": None, "client_cores": None,
                    "other_processes_cores": None}
        other = (machine - self.machine) - server - client
        return {"seconds": round(wall, 1), "server_cores": round(server / wall, 2),
                "client_cores": round(client / wall, 2),
                "other_processes_cores": round(max(0.0, other) / wall, 2)}


def child_pids(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        pass
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return children


# -- the server process ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BackendProcess:
    """``cmd`` run from the repo root in its own process group, output to ``log_path``; started
    when ``GET /health`` answers 200."""

    def __init__(self, cmd: List[str], port: int, env: Dict[str, str], log_path: Path):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env}
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.process: Optional[subprocess.Popen] = None
        self.cleanup: List[Path] = []  # directories removed at stop
        self.cwd = ROOT  # the tree whose code runs (``python -m`` imports from there first)

    def start(self, timeout: float) -> "BackendProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the backend exited with {self.process.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the backend did not answer /health within {timeout:.0f} s")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.process is None or self.process.poll() is not None:
                return
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        finally:
            for path in self.cleanup:
                shutil.rmtree(path, ignore_errors=True)


# -- inputs --------------------------------------------------------------------------------------
def ensure_checkpoints(names: Sequence[str], weights_dir: Path,
                       make_missing: bool = True) -> Dict[str, Tuple[str, Path]]:
    """name -> (variant key, checkpoint path); seeded random-weight files made with
    ``sam-backend weights random`` when missing (``make_missing``), reused otherwise."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "sam_backend.cli"]
    listing = subprocess.run(cli + ["weights", "list", "--dir", str(weights_dir)], cwd=ROOT,
                             text=True, capture_output=True, check=True).stdout
    rows = []  # (key, is_default, file)
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 3 and "/" in parts[0] and not parts[0].startswith("http"):
            is_default = parts[1] == "*"
            file_name = parts[2] if is_default else parts[1]
            rows.append((parts[0], is_default, file_name))
    found: Dict[str, Tuple[str, Path]] = {}
    for name in names:
        if "/" in name:
            match = [r for r in rows if r[0] == name]
        else:
            match = [r for r in rows if r[0].split("/")[0] == name and r[1]]
        if not match:
            raise SystemExit(f"unknown variant {name!r}: known are {', '.join(r[0] for r in rows)}")
        key, _, file_name = match[0]
        path = weights_dir / file_name  # a file, or a hub-format directory (sam3)
        if not path.exists() and not make_missing:
            raise SystemExit(f"{path} is missing (--weights-dir is never filled with random weights)")
        if not path.exists():
            print(f"# writing a random-weight {key} checkpoint to {path}", flush=True)
            done = subprocess.run(cli + ["weights", "random", key, "--dir", str(weights_dir),
                                         "--seed", str(CHECKPOINT_SEED)],
                                  cwd=ROOT, text=True, capture_output=True)
            if done.returncode != 0 and not path.exists():
                raise SystemExit(f"cannot write {path}:\n{done.stdout}{done.stderr}")
        found[name] = (key, path)
    return found


def draw_image(width: int, height: int, seed: int) -> np.ndarray:
    """BGR uint8: a gradient background with sensor-like noise and a few filled shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 200 + 30, yy / height * 180 + 40,
                     np.full_like(xx, 90 + 60 * rng.random())], axis=-1)
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    s = min(width, height)
    for _ in range(int(rng.integers(4, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(image, (cx, cy), int(rng.integers(s // 12, s // 4)), colour, -1)
        elif kind == 1:
            w, h = int(rng.integers(s // 10, s // 2)), int(rng.integers(s // 10, s // 2))
            cv2.rectangle(image, (cx, cy), (cx + w, cy + h), colour, -1)
        else:
            pts = rng.integers([0, 0], [width, height], size=(int(rng.integers(3, 7)), 2))
            cv2.fillPoly(image, [pts.astype(np.int32)], colour)
    return cv2.GaussianBlur(image, (3, 3), 0)


class Images:
    """JPEG files under ``root/bench-<tag>/``, made once (seeded) and reused."""

    def __init__(self, root: Path):
        self.root = root
        self.sub = f"bench-{IMAGE_TAG}"
        (root / self.sub).mkdir(parents=True, exist_ok=True)

    def get(self, name: str, width: int, height: int) -> "Image":
        rel = f"{self.sub}/{name}-{width}x{height}.jpg"
        path = self.root / rel
        if not path.is_file():
            seed = zlib.crc32(f"{name}-{width}x{height}".encode())
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.jpg")  # concurrent runs
            cv2.imwrite(str(tmp), draw_image(width, height, seed), [cv2.IMWRITE_JPEG_QUALITY, 90])
            os.replace(tmp, path)
        return Image(f"/data/local-files/?d={rel}", width, height, path.stat().st_size)


@dataclass
class Image:
    url: str
    width: int
    height: int
    nbytes: int


# -- requests ------------------------------------------------------------------------------------
def keypoint(image: Image, x: float, y: float, positive: bool, index: int) -> Dict[str, Any]:
    return {"original_width": image.width, "original_height": image.height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": ["object"],
                      "labels": ["object"]},
            "is_positive": positive, "id": f"kp{index}x{x:.2f}y{y:.2f}",
            "from_name": "KeyPointLabels", "to_name": "image", "type": "keypointlabels",
            "origin": "manual"}


_TASK_IDS: Dict[str, int] = {}


def payload(image: Image, points: Optional[Sequence[Tuple[float, float, bool]]],
            config: str) -> Dict[str, Any]:
    task_id = _TASK_IDS.setdefault(image.url, len(_TASK_IDS) + 1)
    context = None if points is None else {
        "result": [keypoint(image, x, y, p, i) for i, (x, y, p) in enumerate(points)]}
    return {"tasks": [{"id": task_id, "data": {"image": image.url}, "annotations": [],
                       "drafts": [], "predictions": [], "project": 1}],
            "project": "1.1700000000", "label_config": config,
            "params": {"login": None, "password": None, "context": context}}


class LogTail:
    """The server's ``predict: N result(s) in X ms`` lines written since the last call."""

    PATTERN = re.compile(r"predict: \d+ result\(s\) in (\d+(?:\.\d+)?) ms")

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def predict_ms(self) -> List[float]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        # only whole lines
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [float(m) for m in self.PATTERN.findall(data[:end].decode(errors="replace"))]


@dataclass
class Sample:
    ms: float
    server_ms: Optional[float]
    response_bytes: int
    regions: Dict[str, int]
    box_area_pct: Optional[float]


class Client:
    def __init__(self, url: str, log_path: Path):
        self.url = url
        self.session = requests.Session()
        self.log = LogTail(log_path)

    def post(self, body: Dict[str, Any], session: Optional[requests.Session] = None,
             read_log: bool = True) -> Sample:
        data = json.dumps(body).encode()
        session = session or self.session
        started = time.perf_counter()
        response = session.post(self.url + "/predict", data=data,
                                headers={"Content-Type": "application/json"}, timeout=600)
        content = response.content
        ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {content[:500]!r}")
        answer = json.loads(content)
        if answer.get("errors"):
            raise RuntimeError(f"/predict answered errors: {answer['errors']}")
        regions: Dict[str, int] = {}
        area = None
        for result in answer.get("results", [])[:1]:
            for region in result.get("result", []):
                regions[region["type"]] = regions.get(region["type"], 0) + 1
                if region["type"] == "rectanglelabels":
                    area = region["value"]["width"] * region["value"]["height"] / 100
        server = None
        if read_log:
            found = self.log.predict_ms()
            server = found[-1] if found else None
        return Sample(ms, server, len(content), regions, area)

    def click(self, image: Image, points, config: str = CONFIG_BRUSH_BOX, **kw) -> Sample:
        return self.post(payload(image, points, config), **kw)

    def open_task(self, image: Image) -> Sample:
        return self.post(payload(image, None, CONFIG_BRUSH_BOX))

    def health(self) -> Dict[str, Any]:
        return self.session.get(self.url + "/health", timeout=10).json()


# -- statistics ----------------------------------------------------------------------------------
def summarise(samples: List[Sample]) -> Dict[str, Any]:
    ms = [s.ms for s in samples]
    server = [s.server_ms for s in samples if s.server_ms is not None]
    arr = np.array(ms)
    out: Dict[str, Any] = {
        "n": len(ms),
        "median_ms": float(np.median(arr)),
        "p50_ms": float(np.percentile(arr, 50)) if len(ms) >= P95_MIN_SAMPLES else None,
        "p95_ms": float(np.percentile(arr, 95)) if len(ms) >= P95_MIN_SAMPLES else None,
        "min_ms": float(arr.min()),
        "max_ms": float(arr.max()),
        "samples_ms": [round(x, 2) for x in ms],
        "server_median_ms": float(np.median(server)) if server else None,
        "response_bytes_median": int(np.median([s.response_bytes for s in samples])),
        "empty_masks": sum(1 for s in samples if not s.regions),
    }
    areas = [s.box_area_pct for s in samples if s.box_area_pct is not None]
    out["box_area_pct_median"] = float(np.median(areas)) if areas else None
    return out


def points_for(rng: np.random.Generator, n: int) -> List[Tuple[float, float]]:
    return [(float(x), float(y)) for x, y in rng.uniform(8, 92, size=(n, 2))]


# -- one backend ---------------------------------------------------------------------------------
@dataclass
class Plan:
    repeats: int
    embedded_repeats: int
    sequences: int


class StartFailure(Exception):
    pass


def start_backend(checkpoint: Path, runtime: str, doc_root: Path, log_path: Path, timeout: float,
                  extra: Sequence[str] = ()) -> Tuple[BackendProcess, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "sam_backend.cli", "serve", "--host", "127.0.0.1", "-p", str(port),
           "--with", f"sam_checkpoint_file={checkpoint}", "device=cpu", f"runtime={runtime}",
           "out_poly=true", *extra]
    # the checkpoint's official file name tells the variant
    image_cache = Path(tempfile.mkdtemp(prefix="sam-bench-imgcache-"))
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(doc_root), "SAM_BACKEND_IMAGE_CACHE_DIR": str(image_cache),
           "SAM_BACKEND_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if log_path.exists():
        log_path.unlink()
    process = BackendProcess(cmd, port, env, log_path)
    process.cleanup.append(image_cache)
    started = time.perf_counter()
    try:
        process.start(timeout=timeout)
    except RuntimeError as exc:
        process.stop()
        raise StartFailure(failure_reason(str(exc), log_path)) from None
    return process, time.perf_counter() - started


def failure_reason(message: str, log_path: Path) -> str:
    """The most telling line of a failed start: the last exception line of a traceback, else
    the last error line that is not the server's own shutdown chatter, else the last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    lines = lines or message.splitlines()
    exception = [l for l in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): ", l)]
    boilerplate = ("Worker failed to boot", "Shutting down", "exited with code", "Worker exiting")
    errors = [l for l in lines if ("ERROR" in l or "Error" in l)
              and not any(b in l for b in boilerplate)]
    reason = (exception or errors or lines or [message])[-1].strip()
    reason = re.sub(r"^\S+ \S+ (ERROR|WARNING|INFO) \S+: ", "", reason)
    return reason[:400]


def fallback_reason(log_path: Path, wanted: str) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    hits = [l for l in lines if wanted in l.lower() and ("fall" in l.lower() or "fail" in l.lower())]
    return re.sub(r"^\S+ \S+ \S+ \S+: ", "", hits[-1]).strip()[:400] if hits else ""


def worker_memory(process: BackendProcess) -> Dict[str, Any]:
    master = process.process.pid
    workers = child_pids(master)
    out: Dict[str, Any] = {"master_pid": master, "worker_pids": workers,
                           "master_rss_bytes": proc_status(master).get("VmRSS")}
    if workers:
        status = proc_status(workers[0])
        out["rss_bytes"] = status.get("VmRSS")
        out["peak_rss_bytes"] = status.get("VmHWM")
    else:  # no worker process: the model lives in the master
        status = proc_status(master)
        out["rss_bytes"] = status.get("VmRSS")
        out["peak_rss_bytes"] = status.get("VmHWM")
    return out


def progress(msg: str) -> None:
    print(f"# [{time.strftime('%H:%M:%S')}] load {os.getloadavg()[0]:.2f}  {msg}", flush=True)


def measure_light(client: Client, images: Images, plan: Plan, rng: np.random.Generator,
                  embedded_points: List[Tuple[float, float]]) -> Dict[str, List[Sample]]:
    """The light plan (LIGHT_VARIANTS): first clicks and 1080p embedded clicks only."""
    emb = images.get("embedded", 1920, 1080)
    progress("first click on the 1080p image (warm-up)")
    first = [client.click(emb, [(50.0, 50.0, True)])]
    for x, y in points_for(rng, 3):
        client.click(emb, [(x, y, True)])
    out = measure_embedded_1080p(client, emb, plan, rng, embedded_points)
    progress(f"first clicks on new 1080p images ({plan.repeats - 1})")
    first += [client.click(images.get(f"first-{i}", 1920, 1080), [(x, y, True)])
              for i, (x, y) in enumerate(points_for(rng, plan.repeats - 1))]
    out["first_click_1080p"] = first
    return out


def measure_embedded_1080p(client: Client, emb: "Image", plan: Plan, rng: np.random.Generator,
                           embedded_points: List[Tuple[float, float]]) -> Dict[str, List[Sample]]:
    """Phase 1: single clicks, 3-point sequences and clicks with polygons on an embedded image."""
    out: Dict[str, List[Sample]] = {}
    progress(f"embedded clicks, 1080p ({plan.embedded_repeats} single, {plan.sequences} 3-point "
             f"sequences, {plan.embedded_repeats} with polygons)")
    out["embedded_click_1080p"] = [client.click(emb, [(x, y, True)]) for x, y in embedded_points]
    third, steps = [], []
    for _ in range(plan.sequences):
        p = points_for(rng, 3)
        steps.append(client.click(emb, [(*p[0], True)]))
        steps.append(client.click(emb, [(*p[0], True), (*p[1], False)]))
        third.append(client.click(emb, [(*p[0], True), (*p[1], False), (*p[2], True)]))
        steps.append(third[-1])
    out["embedded_click_1080p_3pt"] = third
    out["embedded_click_1080p_sequence_steps"] = steps
    out["embedded_click_1080p_poly"] = [client.click(emb, [(x, y, True)], config=CONFIG_WITH_POLY)
                                        for x, y in embedded_points]
    return out


def measure_backend(client: Client, images: Images, plan: Plan, rng: np.random.Generator,
                    embedded_points: List[Tuple[float, float]]) -> Dict[str, List[Sample]]:
    """Phases 1-5 on a started backend; returns the samples of each measurement."""
    out: Dict[str, List[Sample]] = {}
    warm = images.get("warmup", 1920, 1080)
    emb = images.get("embedded", 1920, 1080)
    emb4k = images.get("embedded", 3840, 2160)

    progress("warm-up")
    client.click(warm, [(50.0, 50.0, True)])
    for x, y in points_for(rng, 3):
        client.click(warm, [(x, y, True)])
    seq = points_for(rng, 3)
    client.click(warm, [(*seq[0], True)])
    client.click(warm, [(*seq[0], True), (*seq[1], False)])
    client.click(warm, [(*seq[0], True), (*seq[1], False), (*seq[2], True)])
    client.click(warm, [(40.0, 40.0, True)], config=CONFIG_WITH_POLY)
    client.click(emb, [(50.0, 50.0, True)])  # embeds the image of 1. and 5.
    out["first_click_4k"] = [client.click(emb4k, [(50.0, 50.0, True)], config=CONFIG_WITH_POLY)]
    client.click(emb4k, [(30.0, 30.0, True)], config=CONFIG_WITH_POLY)

    out.update(measure_embedded_1080p(client, emb, plan, rng, embedded_points))

    progress(f"embedded clicks, 3840x2160 with polygons ({plan.embedded_repeats})")
    out["embedded_click_4k_poly"] = [client.click(emb4k, [(x, y, True)], config=CONFIG_WITH_POLY)
                                     for x, y in points_for(rng, plan.embedded_repeats)]

    progress(f"first clicks on new 1080p images ({plan.repeats})")
    out["first_click_1080p"] = [client.click(images.get(f"first-{i}", 1920, 1080), [(x, y, True)])
                                for i, (x, y) in enumerate(points_for(rng, plan.repeats))]

    progress(f"control: {PRECOMPUTE_WAIT_S} s idle, then a click on the embedded image "
             f"({plan.repeats})")
    idle = []
    for x, y in points_for(rng, plan.repeats):
        time.sleep(PRECOMPUTE_WAIT_S)
        idle.append(client.click(emb, [(x, y, True)]))
    out["embedded_click_after_idle_1080p"] = idle

    progress(f"precompute: open, wait {PRECOMPUTE_WAIT_S} s, click ({plan.repeats})")
    opens, clicks = [], []
    for i, (x, y) in enumerate(points_for(rng, plan.repeats)):
        image = images.get(f"precompute-{i}", 1920, 1080)
        opened = time.perf_counter()
        opens.append(client.open_task(image))
        time.sleep(max(0.0, opened + PRECOMPUTE_WAIT_S - time.perf_counter()))
        clicks.append(client.click(image, [(x, y, True)]))
    out["task_open_1080p"] = opens
    out["precompute_click_1080p"] = clicks

    progress(f"clicks while another image is encoding ({plan.repeats})")
    busy, background, overlapped = [], [], 0
    for i in range(plan.repeats):
        image = images.get(f"busy-{i}", 1920, 1080)
        box: Dict[str, Any] = {}

        def fire(image=image, box=box):
            session = requests.Session()
            try:
                box["sample"] = client.click(image, [(50.0, 50.0, True)], session=session,
                                             read_log=False)
            except Exception as exc:  # reported below
                box["error"] = exc
            box["end"] = time.perf_counter()

        thread = threading.Thread(target=fire)
        thread.start()
        time.sleep(BUSY_DELAY_S)
        x, y = embedded_points[i % len(embedded_points)]
        sample = client.click(emb, [(x, y, True)], read_log=False)
        clicked_end = time.perf_counter()
        thread.join()
        if "error" in box:
            raise box["error"]
        busy.append(sample)
        background.append(box["sample"])
        overlapped += box["end"] > clicked_end
        client.log.predict_ms()  # skip both log lines
        time.sleep(0.2)
    out["busy_click_1080p"] = busy
    out["busy_background_first_click"] = background
    out["_busy_overlapped"] = overlapped  # type: ignore[assignment]
    return out


def run_one(name: str, key: str, checkpoint: Path, runtime: str, images: Images, plan: Plan,
            log_dir: Path, timeout: float, seed: int) -> Dict[str, Any]:
    row: Dict[str, Any] = {"variant": key, "runtime_requested": runtime,
                           "load_average_start": loadavg()}
    slug = f"{key.replace('/', '_')}-{runtime}"
    log_path = log_dir / f"{slug}.log"
    row["log"] = str(log_path)
    rng = np.random.default_rng(seed)
    embedded_points = points_for(rng, plan.embedded_repeats)

    progress(f"{key} runtime={runtime}: starting `sam-backend serve`")
    try:
        process, startup = start_backend(checkpoint, runtime, images.root, log_path, timeout)
    except StartFailure as exc:
        row.update(status="unavailable", reason=str(exc))
        progress(f"{key} runtime={runtime}: unavailable: {exc}")
        return row
    try:
        client = Client(process.url, log_path)
        health = client.health()
        row.update(startup_s=round(startup, 2), health=health, runtime=health.get("runtime"))
        if runtime != "auto" and health.get("runtime") != runtime:
            why = fallback_reason(log_path, runtime)
            row.update(status="unavailable",
                       reason=f"runtime={runtime} was asked for, the backend runs "
                              f"{health.get('runtime')}" + (f" ({why})" if why else ""))
            progress(f"{key} runtime={runtime}: {row['reason']}")
            return row
        share = CpuShare([process.process.pid, *child_pids(process.process.pid)])
        light = key in LIGHT_VARIANTS
        row["plan"] = "light (LIGHT_VARIANTS)" if light else "full"
        samples = (measure_light if light else measure_backend)(client, images, plan, rng,
                                                                embedded_points)
        row["cpu_during_measurement"] = share.result()
        overlapped = samples.pop("_busy_overlapped", None)
        health = client.health()
        memory = worker_memory(process)
    except Exception as exc:
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:400],
                   log_tail=process.tail(15))
        progress(f"{key} runtime={runtime}: failed: {exc}")
        return row
    finally:
        process.stop()

    metrics = {k: summarise(v) for k, v in samples.items()}
    if "busy_click_1080p" in metrics:
        metrics["busy_click_1080p"]["background_still_encoding_when_answered"] = overlapped
    cache = health.get("embedding_cache", {})
    memory.update(cache_images=cache.get("images"), cache_bytes=cache.get("bytes"),
                  cache_max_bytes=cache.get("max_bytes"),
                  cache_bytes_per_image=(cache["bytes"] / cache["images"]
                                         if cache.get("images") else None))
    row.update(status="ok", metrics=metrics, memory=memory)
    if light:
        idle = metrics["embedded_click_1080p"]["median_ms"]
        row["ratios"] = {"first_over_embedded": metrics["first_click_1080p"]["median_ms"] / idle}
        row["reencode_backend"] = {"status": "skipped (light plan)"}
        row["targets"] = judge(key, metrics, row["ratios"])
        row["load_average_end"] = loadavg()
        return row

    # 7. the same clicks on a backend that re-encodes every click
    progress(f"{key} runtime={runtime}: re-encoding backend (embedding_cache_mb=1)")
    re_log = log_dir / f"{slug}-reencode.log"
    reencode: Dict[str, Any] = {"options": "embedding_cache_mb=1 (no embedding fits: every click "
                                           "re-encodes)", "log": str(re_log)}
    try:
        process, startup = start_backend(checkpoint, runtime, images.root, re_log, timeout,
                                         extra=["embedding_cache_mb=1"])
    except StartFailure as exc:
        reencode.update(status="unavailable", reason=str(exc))
    else:
        try:
            client = Client(process.url, re_log)
            warm = images.get("warmup", 1920, 1080)
            client.click(warm, [(50.0, 50.0, True)])
            client.click(warm, [(40.0, 60.0, True)])
            emb = images.get("embedded", 1920, 1080)
            progress(f"re-encoding clicks ({plan.repeats})")
            clicks = [client.click(emb, [(x, y, True)])
                      for x, y in embedded_points[:plan.repeats]]
            health = client.health()
            reencode.update(status="ok", startup_s=round(startup, 2),
                            cache_images_after=health.get("embedding_cache", {}).get("images"))
            metrics["reencode_click_1080p"] = summarise(clicks)
        except Exception as exc:
            reencode.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:400])
        finally:
            process.stop()
    row["reencode_backend"] = reencode

    idle = metrics["embedded_click_1080p"]["median_ms"]
    ratios = {"busy_over_idle": metrics["busy_click_1080p"]["median_ms"] / idle,
              "precompute_over_embedded": metrics["precompute_click_1080p"]["median_ms"] / idle,
              "precompute_over_idle_control": metrics["precompute_click_1080p"]["median_ms"]
              / metrics["embedded_click_after_idle_1080p"]["median_ms"],
              "first_over_embedded": metrics["first_click_1080p"]["median_ms"] / idle}
    if "reencode_click_1080p" in metrics:
        ratios["reencode_over_embedded"] = metrics["reencode_click_1080p"]["median_ms"] / idle
    row["ratios"] = ratios
    row["targets"] = judge(key, metrics, ratios)
    row["load_average_end"] = loadavg()
    return row


def judge(key: str, metrics: Dict[str, Any], ratios: Dict[str, float]) -> List[Dict[str, Any]]:
    judged = key in VARIANT_TARGETS
    out = []
    for label, metric, unit, bound in VARIANT_TARGETS.get(key, TARGETS):
        measured = ratios[metric] if unit == "x" else metrics[metric]["median_ms"]
        out.append({"target": label, "metric": metric, "bound": bound, "unit": unit,
                    "measured": measured,
                    "met": (measured <= bound) if judged else None})
    return out


# -- report --------------------------------------------------------------------------------------
def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value / 2 ** 20:.0f} MiB" if value >= 100 * 2 ** 20 else f"{value / 2 ** 20:.1f} MiB"


SUMMARY_COLUMNS = [
    ("first click 1080p", "first_click_1080p"),
    ("embedded click 1080p", "embedded_click_1080p"),
    ("3-point click", "embedded_click_1080p_3pt"),
    ("click 1.5 s after open", "precompute_click_1080p"),
    ("4K embedded click (+poly)", "embedded_click_4k_poly"),
]

DETAIL_ROWS = [
    "first_click_1080p", "embedded_click_1080p", "embedded_click_1080p_3pt",
    "embedded_click_1080p_sequence_steps", "embedded_click_1080p_poly", "task_open_1080p",
    "embedded_click_after_idle_1080p", "precompute_click_1080p", "first_click_4k", "embedded_click_4k_poly", "busy_click_1080p",
    "busy_background_first_click", "reencode_click_1080p",
]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu_model']}, "
        f"{fmt_bytes(m['mem_total_bytes'])} RAM; load average before {report['load_average_before']}"
        f", after {report['load_average_after']}; {report['date']}.",
        f"Versions: torch {report['versions'].get('torch')}, onnxruntime "
        f"{report['versions'].get('onnxruntime')}. Server: {report['server']}. "
        f"{_upper_first(report['plan'].get('weights', ''))}; times are medians of client-side wall "
        f"time per POST /predict.",
        "",
        "| variant | runtime | " + " | ".join(c for c, _ in SUMMARY_COLUMNS)
        + " | click while encoding | re-encode every click | worker RSS | cache / image "
        "| other processes' CPU |",
        "|---|---|" + "---:|" * (len(SUMMARY_COLUMNS) + 5),
    ]
    for row in report["results"]:
        runtime = row.get("runtime") or row["runtime_requested"]
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | {row['runtime_requested']} | "
                         f"{row['status']}: {row['reason'].replace('|', '/')} |"
                         + " |" * (len(SUMMARY_COLUMNS) + 4))
            continue
        met = row["metrics"]
        cells = [fmt_ms(met[k]["median_ms"]) if k in met else "–" for _, k in SUMMARY_COLUMNS]
        busy = (f"{fmt_ms(met['busy_click_1080p']['median_ms'])} "
                f"({row['ratios']['busy_over_idle']:.1f}×)" if "busy_click_1080p" in met else "–")
        if "reencode_click_1080p" in met:
            reenc = (f"{fmt_ms(met['reencode_click_1080p']['median_ms'])} "
                     f"({row['ratios']['reencode_over_embedded']:.0f}×)")
        else:
            reenc = f"{row['reencode_backend'].get('status')}: {row['reencode_backend'].get('reason', '')}"
        mem = row["memory"]
        lines.append(f"| {row['variant']} | {runtime} | " + " | ".join(cells)
                     + f" | {busy} | {reenc} | {fmt_bytes(mem.get('rss_bytes'))} | "
                       f"{fmt_bytes(mem.get('cache_bytes_per_image'))} | "
                       f"{row.get('cpu_during_measurement', {}).get('other_processes_cores')} "
                       f"cores |")

    lines += ["", "Targets (judged for " + ", ".join(VARIANT_TARGETS) + "):", "",
              "| variant | runtime | target | bound | measured | met |", "|---|---|---|---:|---:|---|"]
    for row in report["results"]:
        if row["status"] != "ok":
            lines.append(f"| {row['variant']} | {row['runtime_requested']} | all | | "
                         f"{row['status']} | no |")
            continue
        for t in row["targets"]:
            bound = f"≤ {t['bound']:.0f} ms" if t["unit"] == "ms" else f"≤ {t['bound']:.0f}×"
            measured = fmt_ms(t["measured"]) if t["unit"] == "ms" else f"{t['measured']:.2f}×"
            if t["metric"] == "precompute_click_1080p":
                measured += (f" ({row['ratios']['precompute_over_embedded']:.2f}× the embedded "
                             f"click, {row['ratios']['precompute_over_idle_control']:.2f}× an "
                             f"embedded click after {PRECOMPUTE_WAIT_S} s idle)")
            if t["met"] is None:
                met = "n/a"
            elif t["met"]:
                met = "yes"
            else:
                over = t["measured"] / t["bound"]
                met = f"**no** ({over:.2f}× the bound)"
            lines.append(f"| {row['variant']} | {row['runtime']} | {t['target']} | {bound} | "
                         f"{measured} | {met} |")

    lines += ["", "Details (client time; server = the backend's own `predict: ... in X ms`; "
                  "p50/p95 from 10 samples up):", "",
              "| variant | runtime | measurement | n | median | p50 | p95 | min | max | server "
              "median | response | empty masks |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        if row["status"] != "ok":
            continue
        for k in DETAIL_ROWS:
            s = row["metrics"].get(k)
            if not s:
                continue
            lines.append(f"| {row['variant']} | {row['runtime']} | {k} | {s['n']} | "
                         f"{fmt_ms(s['median_ms'])} | {fmt_ms(s['p50_ms'])} | {fmt_ms(s['p95_ms'])} | "
                         f"{fmt_ms(s['min_ms'])} | {fmt_ms(s['max_ms'])} | "
                         f"{fmt_ms(s['server_median_ms'])} | {s['response_bytes_median'] / 1024:.0f} KiB"
                         f" | {s['empty_masks']} |")
    notes = []
    for row in report["results"]:
        if row["status"] != "ok":
            continue
        if "random" in report["plan"].get("weights", "") and not notes:
            s = row["metrics"]["embedded_click_1080p"]
            notes.append(
                f"- Random-weight masks are not object masks: their box is "
                f"{s['box_area_pct_median']:.0f}% of the image (median) and they are fragmented, so "
                f"a 1080p answer is ~{s['response_bytes_median'] / 1024:.0f} KiB of JSON (a real "
                f"object's brush RLE is a few KiB) and the 4K polygons have thousands of vertices: "
                f"RLE, polygons and JSON cost more here than with trained weights.")
        re_ = row.get("reencode_backend", {})
        cpu = row.get("cpu_during_measurement", {})
        if "busy_click_1080p" not in row["metrics"]:
            notes.append(
                f"- {row['variant']} {row['runtime']} ({row.get('plan')} plan): start-up "
                f"{row['startup_s']} s; worker RSS {fmt_bytes(row['memory'].get('rss_bytes'))} "
                f"(peak {fmt_bytes(row['memory'].get('peak_rss_bytes'))}), embedding cache "
                f"{row['memory'].get('cache_images')} images / "
                f"{fmt_bytes(row['memory'].get('cache_bytes'))}; load average "
                f"{row['load_average_start']} → {row.get('load_average_end')}; during the "
                f"measurement ({cpu.get('seconds')} s) the backend used {cpu.get('server_cores')} "
                f"cores on average, other processes on the machine "
                f"{cpu.get('other_processes_cores')}.")
            continue
        notes.append(
            f"- {row['variant']} {row['runtime']}: start-up {row['startup_s']} s; "
            f"worker RSS {fmt_bytes(row['memory'].get('rss_bytes'))} (peak "
            f"{fmt_bytes(row['memory'].get('peak_rss_bytes'))}) after the run, embedding cache "
            f"{row['memory'].get('cache_images')} images / {fmt_bytes(row['memory'].get('cache_bytes'))}; "
            f"the background first click was still encoding when the busy click was answered in "
            f"{row['metrics']['busy_click_1080p']['background_still_encoding_when_answered']} of "
            f"{row['metrics']['busy_click_1080p']['n']} cases; re-encode backend "
            f"({re_.get('options')}): {re_.get('status')}, cache images after its run: "
            f"{re_.get('cache_images_after')}; load average {row['load_average_start']} → "
            f"{row.get('load_average_end')}; during the measurement ({cpu.get('seconds')} s) the "
            f"backend used {cpu.get('server_cores')} cores on average, other processes on the "
            f"machine {cpu.get('other_processes_cores')}.")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mobile_sam",
                        help="comma-separated: model_name or model_name/sam_config "
                             "(e.g. mobile_sam,sam_hq/vit_tiny,sam/vit_b)")
    parser.add_argument("--runtimes", default="torch,onnx", help="comma-separated: torch, onnx, auto")
    parser.add_argument("--repeats", type=int, default=5,
                        help="samples of the slow measurements: first clicks, precompute clicks, "
                             "clicks while encoding, re-encoding clicks (default 5)")
    parser.add_argument("--embedded-repeats", type=int, default=None,
                        help="samples of clicks on embedded images (default 3 x --repeats); "
                             "3-point sequences: a third of it")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="random-weight checkpoints (weights/), images (images/) and server "
                             "logs (logs/); reused between runs")
    parser.add_argument("--weights-dir", default=None,
                        help="use the checkpoints in this directory (e.g. real ones) instead of "
                             "random-weight files in --cache-dir/weights; nothing is written there")
    parser.add_argument("--start-timeout", type=float, default=900.0,
                        help="seconds to wait for /health (an onnx export happens at first start)")
    parser.add_argument("--log-dir", default=None,
                        help="server logs, one per backend started (default --cache-dir/logs)")
    parser.add_argument("--seed", type=int, default=0, help="click positions")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "http.json"))
    args = parser.parse_args(argv)

    repeats = max(1, args.repeats)
    embedded = max(2, args.embedded_repeats or 3 * repeats)
    plan = Plan(repeats, embedded, max(2, embedded // 3))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    cache_dir = Path(args.cache_dir).expanduser()
    if args.log_dir:
        log_dir = Path(args.log_dir).expanduser()
    else:  # one directory per run: two runs at once must not share (and delete) server logs
        log_dir = cache_dir / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        old_runs = sorted(d for d in (cache_dir / "logs").glob("*-*") if d.is_dir())
        for old in old_runs[:-9]:
            shutil.rmtree(old, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)

    report: Dict[str, Any] = {
        "benchmark": "http end to end (benchmarks/bench_http.py)",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "load_average_before": loadavg(),
        "server": "`sam-backend serve` (waitress, 1 process, 8 threads) on 127.0.0.1, "
                  "device=cpu out_poly=true, other options at their defaults",
        "plan": {"variants": variants, "runtimes": runtimes, "repeats": plan.repeats,
                 "embedded_repeats": plan.embedded_repeats, "sequences": plan.sequences,
                 "precompute_wait_s": PRECOMPUTE_WAIT_S, "busy_delay_s": BUSY_DELAY_S,
                 "checkpoint_seed": CHECKPOINT_SEED, "click_seed": args.seed,
                 "images": "JPEG q90, 1920x1080 and 3840x2160, gradient + noise + 4-7 filled "
                           "shapes, served through LOCAL_FILES_DOCUMENT_ROOT",
                 "cache_dir": str(cache_dir)},
        "results": [],
    }
    progress(f"machine: {report['machine']['cores']} cores, {report['machine']['cpu_model']}; "
             f"load average {report['load_average_before']}")
    if args.weights_dir:
        checkpoints = ensure_checkpoints(variants, Path(args.weights_dir).expanduser(), False)
    else:
        checkpoints = ensure_checkpoints(variants, cache_dir / "weights")
    report["plan"]["weights"] = ("checkpoints from " + args.weights_dir if args.weights_dir else
                                 f"random-weight checkpoints (seed {CHECKPOINT_SEED})")
    report["plan"]["log_dir"] = str(log_dir)
    images = Images(cache_dir / "images")
    for name in variants:
        key, checkpoint = checkpoints[name]
        for runtime in runtimes:
            report["results"].append(run_one(name, key, checkpoint, runtime, images, plan,
                                             log_dir, args.start_timeout, args.seed))
    report["load_average_after"] = loadavg()
    report["table_markdown"] = markdown(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(report["table_markdown"])
    print(f"wrote {out}")
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
