"""Checkpoint downloads against a real HTTP mirror on loopback (SAM_BACKEND_WEIGHTS_URL).

The mirror serves random-weight checkpoints; it supports Range requests and can cut a transfer
mid-body, ignore Range, and publish (or not) ``<file>.sha256``. Everything goes over real sockets.
"""
from __future__ import annotations

import hashlib
import os
import sys
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Union
from urllib.parse import urlsplit

import numpy as np
import pytest

from sam_backend.models.checkpoints import ensure_checkpoint, infer_variant, resolve_names
from sam_backend.models.download import download
from sam_backend.cli import main
from sam_backend.errors import CheckpointError, ConfigError
from sam_backend.models.registry import VARIANTS, get_variant

MOBILE = get_variant("mobile_sam")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Mirror:
    """A loopback HTTP file server with knobs for the failure modes under test."""

    def __init__(self):
        self.files: Dict[str, Union[Path, bytes]] = {}
        self.sidecars: Dict[str, str] = {}  # name -> content of name.sha256 (else 404)
        self.cut_once: Dict[str, int] = {}  # name -> bytes sent before closing, first GET only
        self.ignore_range = False
        self.requests: List[dict] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=()):
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                name = urlsplit(self.path).path.rsplit("/", 1)[-1]
                mirror.requests.append({"path": name, "range": self.headers.get("Range")})
                if name.endswith(".sha256"):
                    content = mirror.sidecars.get(name[:-len(".sha256")])
                    if content is None:
                        return self._send(404, b"not found")
                    return self._send(200, content.encode(), [("Content-Type", "text/plain")])
                source = mirror.files.get(name)
                if source is None:
                    return self._send(404, b"not found")
                data = source if isinstance(source, bytes) else None
                size = len(data) if data is not None else source.stat().st_size
                start = 0
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match and not mirror.ignore_range:
                    start = int(match.group(1))
                    if start >= size:
                        return self._send(416, b"", [("Content-Range", f"bytes */{size}")])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = mirror.cut_once.pop(name, None)
                end = size if limit is None else min(size, start + limit)
                try:
                    if data is not None:
                        self.wfile.write(data[start:end])
                    else:
                        with open(source, "rb") as f:
                            f.seek(start)
                            left = end - start
                            while left > 0:
                                block = f.read(min(left, 1 << 20))
                                self.wfile.write(block)
                                left -= len(block)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                if limit is not None:  # cut the connection mid-body
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    server = Mirror()
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_URL", server.url)
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("SAM_BACKEND_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield server
    server.close()


@pytest.fixture(scope="module")
def mobile_file(checkpoint_factory) -> Path:
    return checkpoint_factory("mobile_sam")


def weights_dir(tmp_path) -> Path:
    return tmp_path / "weights"


def leftovers(tmp_path) -> List[str]:
    d = weights_dir(tmp_path)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# -- success -------------------------------------------------------------------------------------
def test_download_then_load_and_segment(mirror, mobile_file, tmp_path, caplog):
    from sam_backend.models.loading import load_model
    from sam_backend.models.base import Prompt
    from sam_backend.models.torch_runtime import TorchSamModel

    mirror.files["mobile_sam.pt"] = mobile_file
    # A published digest in `sha256sum` format is checked too.
    mirror.sidecars["mobile_sam.pt"] = f"{sha256_of(mobile_file)}  mobile_sam.pt\n"
    caplog.set_level("INFO", logger="sam_backend")
    path = download(MOBILE)
    assert path == weights_dir(tmp_path) / "mobile_sam.pt"
    assert sha256_of(path) == sha256_of(mobile_file)
    assert leftovers(tmp_path) == ["mobile_sam.pt"]
    assert any("100%" in r.getMessage() for r in caplog.records)  # progress, in the log
    assert not any("?" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)

    sam = load_model(MOBILE, path)
    model = TorchSamModel(MOBILE, sam=sam)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    prediction = model.decode(model.embed(image), Prompt(np.array([[10.0, 10.0]]), np.array([1])))
    assert prediction.mask.shape == (48, 80)
    assert prediction.mask.dtype == bool

    # Already present: no second transfer.
    before = len(mirror.requests)
    assert download(MOBILE) == path
    assert len(mirror.requests) == before


# -- check 1: SAM's name digest ------------------------------------------------------------------
def test_sam_file_whose_digest_does_not_match_its_name_is_refused(mirror, checkpoint_factory,
                                                                  tmp_path):
    variant = get_variant("sam", "vit_b")
    random_vit_b = checkpoint_factory("sam", "vit_b")
    assert not sha256_of(random_vit_b).startswith("01ec64")
    mirror.files["sam_vit_b_01ec64.pth"] = random_vit_b
    with pytest.raises(CheckpointError, match=r"failed check 1 .*does not start with 01ec64"):
        download(variant, progress=False)
    assert leftovers(tmp_path) == []


# -- check 3: loads into its architecture ---------------------------------------------------------
def test_truncated_file_is_refused(mirror, mobile_file, tmp_path):
    data = mobile_file.read_bytes()
    mirror.files["mobile_sam.pt"] = data[: len(data) // 2]  # Content-Length of the half
    with pytest.raises(CheckpointError, match=r"failed check 3 \(loads into mobile_sam/vit_t\)"):
        download(MOBILE, progress=False)
    assert leftovers(tmp_path) == []


def test_wrong_architecture_is_refused(mirror, checkpoint_factory, tmp_path):
    # sam_hq's tiny file served as mobile_sam.pt: readable, but extra keys.
    mirror.files["mobile_sam.pt"] = checkpoint_factory("sam_hq", "vit_tiny")
    with pytest.raises(CheckpointError, match=r"check 3 .*unexpected keys.*sam_hq/vit_tiny"):
        download(MOBILE, progress=False)
    assert leftovers(tmp_path) == []


# -- check 2: SHA-256 given or published ---------------------------------------------------------
def test_wrong_published_sha256_is_refused(mirror, mobile_file, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    mirror.sidecars["mobile_sam.pt"] = "0" * 64 + "\n"
    with pytest.raises(CheckpointError, match=r"failed check 2 \(the mirror's mobile_sam.pt.sha256\)"):
        download(MOBILE, progress=False)
    assert leftovers(tmp_path) == []


def test_malformed_published_sha256_is_refused_before_downloading(mirror, mobile_file, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    mirror.sidecars["mobile_sam.pt"] = "<html>oops</html>"
    with pytest.raises(CheckpointError, match="does not hold a SHA-256"):
        download(MOBILE, progress=False)
    assert [r["path"] for r in mirror.requests] == ["mobile_sam.pt.sha256"]
    assert leftovers(tmp_path) == []


def test_given_sha256(mirror, mobile_file, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    with pytest.raises(CheckpointError, match=r"failed check 2 \(--sha256\)"):
        download(MOBILE, sha256="ab" * 32, progress=False)
    assert leftovers(tmp_path) == []
    with pytest.raises(ConfigError, match="64 hex digits"):
        download(MOBILE, sha256="abc", progress=False)
    path = download(MOBILE, sha256=sha256_of(mobile_file).upper(), progress=False)
    assert sha256_of(path) == sha256_of(mobile_file)


# -- resume --------------------------------------------------------------------------------------
def test_interrupted_download_resumes(mirror, mobile_file, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    cut = 5 * 1024 * 1024 + 123
    mirror.cut_once["mobile_sam.pt"] = cut
    with pytest.raises(CheckpointError, match="interrupted.*kept.*resume"):
        download(MOBILE, progress=False)
    part = weights_dir(tmp_path) / "mobile_sam.pt.part"
    assert leftovers(tmp_path) == ["mobile_sam.pt.part"]
    kept = part.stat().st_size
    assert 0 < kept <= cut

    path = download(MOBILE, progress=False)
    file_gets = [r for r in mirror.requests if r["path"] == "mobile_sam.pt"]
    assert [r["range"] for r in file_gets] == [None, f"bytes={kept}-"]
    assert path.read_bytes() == mobile_file.read_bytes()
    assert leftovers(tmp_path) == ["mobile_sam.pt"]


def test_server_ignoring_range_restarts_from_zero(mirror, mobile_file, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    mirror.ignore_range = True
    weights_dir(tmp_path).mkdir(parents=True)
    (weights_dir(tmp_path) / "mobile_sam.pt.part").write_bytes(b"junk" * 1000)
    path = download(MOBILE, progress=False)
    assert mirror.requests[-1]["range"] == "bytes=4000-"
    assert path.read_bytes() == mobile_file.read_bytes()
    assert leftovers(tmp_path) == ["mobile_sam.pt"]


# -- unreachable / offline -----------------------------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mirror_fails_at_once_leaving_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/m?token=s3cr3t")
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("SAM_BACKEND_OFFLINE", raising=False)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        download(MOBILE, progress=False)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "unreachable (connection refused)" in message
    assert str(tmp_path / "mobile_sam.pt") in message  # where to put it by hand
    assert MOBILE.url in message
    assert "s3cr3t" not in message
    assert list(tmp_path.iterdir()) == []


def test_offline_refuses(mirror, mobile_file, monkeypatch, tmp_path):
    mirror.files["mobile_sam.pt"] = mobile_file
    with pytest.raises(CheckpointError, match="downloads are off") as err:
        download(MOBILE, offline=True)
    assert str(weights_dir(tmp_path) / "mobile_sam.pt") in str(err.value)
    with pytest.raises(CheckpointError, match=r"sam-backend weights download mobile_sam/vit_t"):
        ensure_checkpoint(MOBILE, offline=True)
    # the command line reads SAM_BACKEND_OFFLINE through the settings, and --offline
    monkeypatch.setenv("SAM_BACKEND_OFFLINE", "1")
    assert main(["weights", "download", "mobile_sam"]) == 2
    monkeypatch.delenv("SAM_BACKEND_OFFLINE")
    assert main(["weights", "download", "mobile_sam", "--offline"]) == 2
    assert mirror.requests == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("option,env,downloads", [("false", "1", True), ("true", "0", False)])
def test_offline_option_beats_the_environment(mirror, mobile_file, monkeypatch, tmp_path,
                                              option, env, downloads):
    """README: an option (``--with offline=...``) beats the environment variable. The start-up
    path (settings -> checkpoint -> model) with ``offline=false`` downloads although
    ``SAM_BACKEND_OFFLINE=1``, and ``offline=true`` refuses although ``SAM_BACKEND_OFFLINE=0``."""
    from sam_backend.assembly import build_model
    from sam_backend.settings import Settings

    mirror.files["mobile_sam.pt"] = mobile_file
    monkeypatch.setenv("SAM_BACKEND_OFFLINE", env)
    settings = Settings.load({"model_name": "mobile_sam", "offline": option, "runtime": "torch",
                              "device": "cpu"})
    if downloads:
        model = build_model(settings)
        assert model.variant == MOBILE
        assert (weights_dir(tmp_path) / "mobile_sam.pt").read_bytes() == mobile_file.read_bytes()
        assert [r["path"] for r in mirror.requests].count("mobile_sam.pt") == 1
    else:
        with pytest.raises(CheckpointError, match="downloads are off"):
            build_model(settings)
        assert mirror.requests == []
        assert leftovers(tmp_path) == []


# -- the backend's start-up path -----------------------------------------------------------------
def test_ensure_checkpoint_downloads_a_missing_default(mirror, mobile_file, tmp_path, caplog):
    mirror.files["mobile_sam.pt"] = mobile_file
    caplog.set_level("INFO", logger="sam_backend")
    path = ensure_checkpoint(MOBILE)
    assert path == weights_dir(tmp_path) / "mobile_sam.pt"
    assert path.read_bytes() == mobile_file.read_bytes()
    messages = [r.getMessage() for r in caplog.records]
    assert any("missing: downloading" in m for m in messages)
    assert any(re.search(r"mobile_sam.pt:\s+\d+%", m) for m in messages)
    count = len(mirror.requests)
    assert ensure_checkpoint(MOBILE, str(path)) == path
    assert len(mirror.requests) == count

    # An explicit path with the official name is downloaded into its own directory ...
    elsewhere = tmp_path / "other" / "mobile_sam.pt"
    assert ensure_checkpoint(MOBILE, elsewhere) == elsewhere
    assert elsewhere.is_file()
    # ... any other missing path is an error, not a download.
    count = len(mirror.requests)
    with pytest.raises(CheckpointError, match="not named like mobile_sam/vit_t's official"):
        ensure_checkpoint(MOBILE, tmp_path / "mine.pt")
    assert len(mirror.requests) == count


# -- names ---------------------------------------------------------------------------------------
def test_resolve_names():
    keys = lambda names: [v.key for v in resolve_names(names)]  # noqa: E731
    assert keys(["mobile_sam"]) == ["mobile_sam/vit_t"]
    assert keys(["sam"]) == ["sam/vit_b"]
    assert keys(["sam_hq/vit_tiny", "sam_vit_h_4b8939.pth", "sam_hq/vit_tiny"]) == \
        ["sam_hq/vit_tiny", "sam/vit_h"]
    assert len(resolve_names(["all"])) == len(VARIANTS)
    with pytest.raises(ConfigError, match=r"unknown checkpoint name 'sam9'.*mobile_sam.*"
                                          r"sam_hq/vit_tiny.*sam_vit_b_01ec64.pth.*all"):
        resolve_names(["sam9"])


@pytest.mark.parametrize("kwargs,key", [
    (dict(checkpoint="sam_vit_h_4b8939.pth"), "sam/vit_h"),
    (dict(checkpoint="/models/sam_hq_vit_tiny.pth"), "sam_hq/vit_tiny"),
    (dict(checkpoint="weights/mobile_sam.pt"), "mobile_sam/vit_t"),
    (dict(), "mobile_sam/vit_t"),
    (dict(model_name="", sam_config="", checkpoint=""), "mobile_sam/vit_t"),
    (dict(model_name="sam"), "sam/vit_b"),
    (dict(model_name="sam", checkpoint="/w/sam_vit_l_0b3195.pth"), "sam/vit_l"),
    (dict(model_name="sam_hq", sam_config="vit_h", checkpoint="/w/custom.pth"), "sam_hq/vit_h"),
    (dict(checkpoint="/w/sam_hq_vit_l.pth", sam_config="vit_l"), "sam_hq/vit_l"),
])
def test_infer_variant(kwargs, key):
    assert infer_variant(**kwargs).key == key


def test_infer_variant_errors():
    with pytest.raises(ConfigError, match=r"cannot tell which model .*finetuned.pth.*Set model_name"):
        infer_variant(checkpoint="/w/finetuned.pth")
    with pytest.raises(ConfigError, match="does not match"):
        infer_variant(checkpoint="sam_vit_h_4b8939.pth", sam_config="vit_b")
    with pytest.raises(ConfigError, match="unknown model_name"):
        infer_variant(model_name="sam4")


# -- command line --------------------------------------------------------------------------------
def test_cli_list(mirror, mobile_file, tmp_path, capsys):
    weights_dir(tmp_path).mkdir(parents=True)
    (weights_dir(tmp_path) / "mobile_sam.pt").write_bytes(b"x" * 2048)
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for variant in VARIANTS.values():
        assert variant.key in out and variant.checkpoint_name in out
    line = next(line for line in out.splitlines() if line.startswith("mobile_sam/vit_t"))
    assert "yes, 2.0 KB" in line and MOBILE.url in line
    assert f"downloads from:    {mirror.url}/<FILE> (mirror, SAM_BACKEND_WEIGHTS_URL)" in out
    line = next(line for line in out.splitlines() if line.startswith("sam/vit_h"))
    assert " no " in line


def test_cli_download(mirror, mobile_file, tmp_path, capsys):
    mirror.files["mobile_sam.pt"] = mobile_file
    assert main(["weights", "download", "mobile_sam"]) == 0
    out = capsys.readouterr().out
    assert f"mobile_sam/vit_t: {weights_dir(tmp_path) / 'mobile_sam.pt'}" in out
    assert (weights_dir(tmp_path) / "mobile_sam.pt").read_bytes() == mobile_file.read_bytes()
    # Errors are exit code 2, not tracebacks.
    assert main(["weights", "download", "sam_hq/vit_tiny"]) == 2  # the mirror lacks it
    assert main(["weights", "download", "nonsense"]) == 2


def test_cli_random(tmp_path, capsys, monkeypatch):
    from sam_backend.models.loading import load_model

    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path / "unused"))
    out_dir = tmp_path / "rand"
    assert main(["weights", "random", "mobile_sam", "--dir", str(out_dir), "--seed", "3"]) == 0
    captured = capsys.readouterr()
    assert f"mobile_sam/vit_t: {out_dir / 'mobile_sam.pt'}" in captured.out
    assert "MEANINGLESS" in captured.err
    load_model(MOBILE, out_dir / "mobile_sam.pt")
    # Never replaces an existing file silently.
    assert main(["weights", "random", "mobile_sam", "--dir", str(out_dir)]) == 2
    assert not (tmp_path / "unused").exists()


@pytest.mark.process
def test_backend_start_downloads_the_missing_default_checkpoint(mirror, mobile_file, tmp_path,
                                                                image_factory):
    """The production entry (`sam-backend serve`, waitress) with no checkpoint on disk: it
    downloads weights/mobile_sam.pt from the mirror, loads it, and serves clicks."""
    import cv2
    import requests
    from tests.support.server_utils import BackendProcess, free_port

    mirror.files["mobile_sam.pt"] = mobile_file
    image_path = tmp_path / "cat.png"
    cv2.imwrite(str(image_path), image_factory(120, 160))
    port = free_port()
    backend = BackendProcess(
        ["sam-backend", "serve", "--port", str(port), "--host", "127.0.0.1", "--threads", "4",
         "--with", "model_name=mobile_sam", "device=cpu"], port,
        env={"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)},  # the click's image is a local file
        log_path=tmp_path / "serve.log")
    backend.start()
    try:
        assert (tmp_path / "weights" / "mobile_sam.pt").read_bytes() == mobile_file.read_bytes()
        assert [r["path"] for r in mirror.requests].count("mobile_sam.pt") == 1
        log = backend.log_path.read_text()
        assert "100%" in log  # download progress reached the log
        health = requests.get(backend.url + "/health", timeout=5).json()
        assert health["model"] == "mobile_sam/vit_t"
        config = ('<View><Image name="image" value="$image"/><KeyPointLabels name="kp" '
                  'toName="image" smart="true"><Label value="a"/></KeyPointLabels>'
                  '<BrushLabels name="brush" toName="image"><Label value="a"/></BrushLabels></View>')
        click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image",
                 "original_width": 160, "original_height": 120, "is_positive": True,
                 "value": {"x": 50, "y": 50, "keypointlabels": ["a"]}}
        response = requests.post(backend.url + "/predict", timeout=60, json={
            "tasks": [{"id": 1, "data": {"image": str(image_path)}}], "label_config": config,
            "params": {"context": {"result": [click]}}})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["result"][0]["from_name"] == "brush"
    finally:
        backend.stop()


@pytest.mark.process
def test_backend_start_offline_without_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    import subprocess

    env = dict(os.environ, SAM_BACKEND_WEIGHTS_DIR=str(tmp_path / "weights"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("SAM_BACKEND_WEIGHTS_URL", None)
    result = subprocess.run(
        ["label-studio-ml", "start", "sam", "--with", "model_name=sam_hq", "sam_config=vit_tiny",
         "offline=true", "-p", "1"], cwd=Path(__file__).resolve().parents[2], env=env,
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "sam_hq_vit_tiny.pth" in output
    assert "sam-backend weights download sam_hq/vit_tiny" in output
    assert "Running on" not in output  # it did not start serving
