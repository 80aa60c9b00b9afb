"""The version store on a real file system: publishing is atomic (manifest last, one rename),
the pointer switches atomically, rollback walks back the served versions, and a half-written or
damaged version is never listed or loaded. (The model files here are bytes: the store never
reads them as a model before they pass the checksums, which is what these tests exercise.)"""
from __future__ import annotations

import json

import pytest

from sam_backend.training.report import read_report_json
from sam_backend.training.versions import MANIFEST, CorruptVersion, VersionStore


def _work(store: VersionStore, project: int, payload: bytes = b"weights") -> "Path":
    work = store.work_dir(project)
    (work / "model").mkdir()
    (work / "model" / "model.safetensors").write_bytes(payload)
    (work / "model" / "sam_backend_model.json").write_text(json.dumps({"kind": "rf_detr"}))
    return work


def _publish(store, project=7, payload=b"weights", metric_value=0.5):
    report = {"metric": "segm", "candidate": {"segm": {"mAP": metric_value}}}
    return store.publish(project, _work(store, project, payload), "rf_detr", report)


def test_publish_numbers_versions_and_writes_report_and_manifest_last(tmp_path):
    store = VersionStore(tmp_path)
    work = _work(store, 7)
    assert work.name.startswith(".work-") and store.versions(7) == []
    drawn = []
    v1 = store.publish(7, work, "rf_detr", {"metric": "segm"},
                       before_manifest=lambda d, r: drawn.append((d, r["version"])) or
                       (d / "report.png").write_bytes(b"png"))
    assert not work.exists() and v1.path == tmp_path / "project-7" / "v1"
    assert (v1.name, v1.kind, v1.model_dir) == ("p7-v1", "rf_detr", v1.path / "model")
    assert drawn == [(work, "p7-v1")]  # drawn before the manifest, knowing its name
    report = read_report_json(v1.path / "report.json")
    assert report["version"] == "p7-v1" and report["project"] == 7
    assert set(report["checksums"]) == {"model/model.safetensors", "model/sam_backend_model.json"}
    manifest = json.loads((v1.path / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model/model.safetensors", "model/sam_backend_model.json",
                                      "report.json", "report.png"}
    store.verify(v1)
    assert store.current(7) is None  # published is not served
    v2 = _publish(store)
    assert [v.name for v in store.versions(7)] == ["p7-v1", "p7-v2"] and v2.number == 2


def test_work_dirs_and_incomplete_versions_are_never_listed_or_served(tmp_path):
    store = VersionStore(tmp_path)
    v1 = _publish(store)
    store.promote(7, v1, "first")
    _work(store, 7)  # a run that died before publishing
    half = tmp_path / "project-7" / "v2"  # a copy without its manifest
    (half / "model").mkdir(parents=True)
    assert [v.name for v in store.versions(7)] == ["p7-v1"]
    (tmp_path / "project-7" / "current").write_text("v2\n")
    assert store.current(7) is None  # points at nothing complete: serves nothing
    with pytest.raises(CorruptVersion, match="incomplete"):
        store.version(7, 2)
    # the next publication does not reuse the half-written number
    assert _publish(store).name == "p7-v3"
    assert store.clean_work_dirs(7) and not list((tmp_path / "project-7").glob(".work-*"))


def test_promote_switches_the_pointer_atomically_and_rollback_walks_back(tmp_path):
    store = VersionStore(tmp_path)
    assert store.pointer_stamp(7) is None
    v1, v2, v3 = (_publish(store, payload=bytes([n])) for n in range(3))
    store.promote(7, v1, "first")
    stamp = store.pointer_stamp(7)
    assert store.current(7).name == "p7-v1" and stamp is not None
    store.promote(7, v2, "better")
    store.promote(7, v3, "better still")
    assert store.current(7).name == "p7-v3" and store.pointer_stamp(7) != stamp
    assert (tmp_path / "project-7" / "current").read_text() == "v3\n"
    assert store.rollback(7).name == "p7-v2"
    assert store.rollback(7).name == "p7-v1"  # the one served before v2, not v3 again
    with pytest.raises(CorruptVersion, match="no earlier served version"):
        store.rollback(7)
    assert store.rollback(7, to=3).name == "p7-v3"
    with pytest.raises(CorruptVersion, match="already serves"):
        store.rollback(7, to=3)
    with pytest.raises(CorruptVersion, match="does not exist.*p7-v1, p7-v2, p7-v3"):
        store.rollback(7, to=9)
    actions = [(e["action"], e["version"], e["previous"]) for e in store.history(7)]
    assert actions == [("promote", "p7-v1", None), ("promote", "p7-v2", "p7-v1"),
                       ("promote", "p7-v3", "p7-v2"), ("rollback", "p7-v2", "p7-v3"),
                       ("rollback", "p7-v1", "p7-v2"), ("rollback", "p7-v3", "p7-v1")]
    assert [v.name for v in store.versions(7)] == ["p7-v1", "p7-v2", "p7-v3"]  # all kept
    assert store.versions(8) == [] and store.current(8) is None


def test_a_damaged_version_is_refused_with_what_to_do(tmp_path):
    store = VersionStore(tmp_path)
    v1 = _publish(store, payload=b"x" * 1000)
    store.promote(7, v1, "first")
    weights = v1.model_dir / "model.safetensors"
    weights.write_bytes(b"x" * 500)  # truncated
    with pytest.raises(CorruptVersion) as info:
        store.load_detector(v1)
    assert "model/model.safetensors has 500 bytes, the manifest says 1,000" in str(info.value)
    assert "--rollback" in str(info.value)
    weights.write_bytes(b"y" * 1000)  # same size, other bytes
    with pytest.raises(CorruptVersion, match="does not match its checksum"):
        store.verify(v1)
    weights.unlink()
    with pytest.raises(CorruptVersion, match="model.safetensors is missing"):
        store.verify(v1)
    (v1.path / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptVersion, match="incomplete"):
        store.verify(v1)
    v2 = _publish(store)
    (v2.model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(CorruptVersion, match="has 0 bytes"):
        store.rollback(7, to=2)  # a rollback target is checked before it is served
    assert store.current(7) is None  # v1 (served) lost its manifest: nothing is served
    assert [v.name for v in store.versions(7)] == ["p7-v2"]


def test_status_is_written_atomically_and_read_back(tmp_path):
    store = VersionStore(tmp_path)
    assert store.status(3) == {}
    store.write_status(3, {"state": "running", "progress": {"epoch": 1, "epochs": 3}})
    assert store.status(3)["progress"] == {"epoch": 1, "epochs": 3}
    assert [p.name for p in (tmp_path / "project-3").iterdir() if not p.name.startswith(".")] \
        == ["status.json"]
    assert store.projects() == [3]


def test_from_settings_uses_trained_dir_or_the_weights_directory(tmp_path, monkeypatch):
    from sam_backend.settings import Settings

    assert VersionStore.from_settings(Settings.load({"trained_dir": str(tmp_path)})).root \
        == tmp_path
    monkeypatch.setenv("SAM_BACKEND_WEIGHTS_DIR", str(tmp_path / "w"))
    assert VersionStore.from_settings(Settings.load({}, environ={})).root == tmp_path / "w" / \
        "trained"
