"""Training runs end to end (:func:`run_training`) on a small shapes project served by the
loopback stand-in of Label Studio's API, with the REAL reduced RF-DETR trainer from random
weights (1 epoch: these tests check the plumbing, not the learning — tests/training/
test_rf_detr.py checks that): the report and its files, a missing image counted by task id,
too little data refused, the zero-shot concept engine and then the served version as the
baseline on the same held-out tasks, the decision following the figures."""
from __future__ import annotations

import json

import pytest

from sam_backend import cli
from sam_backend.training.base import TrainingStopped
from sam_backend.training.dataset import NotEnoughData
from sam_backend.training.runner import RunInProgress, decide, run_training
from sam_backend.training.versions import VersionStore
from tests.support.training_runs import ShapesProject

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


@pytest.fixture
def shapes(tmp_path):
    project = ShapesProject(tmp_path, n=12, missing=(5,))
    yield project
    project.stop()


def test_decide_not_worse_or_forced():
    assert decide(0.5, 0.4, False)[0] and decide(0.4, 0.4, False)[0]
    promoted, why = decide(0.3, 0.4, False)
    assert not promoted and "0.300 < baseline 0.400" in why
    assert decide(0.3, 0.4, True)[0] and decide(0.0, None, False)[0]


def test_a_run_publishes_promotes_and_reports(shapes, capsys, tmp_path):
    from tests.support.random_weights import cached_random_checkpoint, make_random_grounding_dino

    # no served version yet: the baseline is the zero-shot concept engine (Grounding DINO and
    # MobileSAM with random weights; at most max_instances per label, as it serves: each
    # instance is a mask decode)
    dino = make_random_grounding_dino(tmp_path / "gd", "tiny", seed=7)
    settings = shapes.settings(concept_model="grounding_dino", concept_checkpoint=dino,
                               model_name="mobile_sam", runtime="torch",
                               sam_checkpoint_file=cached_random_checkpoint("mobile_sam"),
                               max_instances=3)
    seen = []
    report = run_training(settings, shapes.project, progress=lambda *a: seen.append(a))
    store = VersionStore(shapes.trained)
    v1 = store.version(shapes.project, 1)
    assert v1.name == report["version"] == "p1-v1"
    if not report["promoted"]:  # random weights may beat 1 epoch: serve v1 for what follows
        store.promote(shapes.project, v1, "test")
    assert report["kind"] == "rf_detr" and report["metric"] == "segm"
    baseline = report["baseline"]
    assert baseline["source"] == "zero-shot grounding_dino" and baseline["error"] is None
    assert baseline["bbox"]["mAP"] is not None and baseline["segm"]["mAP"] is not None
    assert report["promoted"] == (report["candidate"]["segm"]["mAP"] >= baseline["segm"]["mAP"])
    dataset = report["dataset"]
    # task 5's image is gone: left out, counted by id; the other 11 split by task
    assert list(dataset["missing_images"]) == ["5"] and "5" not in map(str, dataset["held_out_ids"])
    assert dataset["train_tasks"] + dataset["held_out_tasks"] == 11
    assert dataset["held_out_tasks"] >= 2 and dataset["classes"] == ["circle", "square"]
    assert dataset["phrases"] == ["circle", "square"]
    assert [e["epoch"] for e in report["epochs"]] == [1]
    assert report["candidate"]["images"] == dataset["held_out_tasks"]
    assert report["options"]["reduced"] is True and report["parent"] is None
    on_disk = json.loads((v1.path / "report.json").read_text())
    assert on_disk["version"] == "p1-v1" and on_disk["checksums"]
    assert (v1.path / "report.png").stat().st_size > 10_000
    assert not (v1.path / "images").exists()  # the downloaded images are not kept
    store.verify(v1)
    status = store.status(shapes.project)
    assert status["state"] == ("succeeded" if report["promoted"] else "not_promoted")
    assert status["progress"] == {"epoch": 1, "epochs": 1}
    stages = {s for s, _, _ in seen}
    assert {"images", "epochs", "candidate", "baseline"} <= stages
    assert ("images", 12, 12) in seen and ("epochs", 1, 1) in seen

    # a second run (sam-backend train) starts from the served version and is compared with it
    # on the same held-out tasks; the decision follows the figures
    assert cli.main(["train", "--project", str(shapes.project), "--no-progress",
                     "--with", *shapes.with_args()]) == 0
    second = json.loads((store.project_dir(shapes.project) / "v2" / "report.json").read_text())
    printed = capsys.readouterr().out
    assert "project 1: p1-v2 (rf_detr)" in printed and "baseline (p1-v1)" in printed
    assert second["parent"] == "p1-v1" and second["baseline"]["source"] == "p1-v1"
    assert second["options"]["start"] == str(v1.model_dir)
    assert second["baseline"]["images"] == dataset["held_out_tasks"]
    assert second["dataset"]["held_out_ids"] == dataset["held_out_ids"]
    candidate, baseline = (second[side]["segm"]["mAP"] for side in ("candidate", "baseline"))
    assert second["promoted"] == (candidate >= baseline)
    assert store.current(shapes.project).name == ("p1-v2" if second["promoted"] else "p1-v1")
    assert [v.name for v in store.versions(shapes.project)] == ["p1-v1", "p1-v2"]
    # the CLI's rollback and status
    assert cli.main(["train", "--project", "1", "--rollback", "--to", "1",
                     "--with", *shapes.with_args()]) == (1 if not second["promoted"] else 0)
    assert store.current(shapes.project).name == "p1-v1"
    capsys.readouterr()
    assert cli.main(["train", "--project", "1", "--status", "--with", *shapes.with_args()]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["served"] == "p1-v1" and status["state"] in ("succeeded", "not_promoted")
    assert [(v["name"], v["served"]) for v in status["versions"]] == [("p1-v1", True),
                                                                      ("p1-v2", False)]


def test_too_few_tasks_is_a_clear_failure_and_no_run(tmp_path):
    shapes = ShapesProject(tmp_path, n=4)
    try:
        with pytest.raises(NotEnoughData, match="4 annotated tasks can be trained on, 6 are"):
            run_training(shapes.settings(), shapes.project)
        store = VersionStore(shapes.trained)
        assert store.versions(1) == [] and store.current(1) is None
        status = store.status(1)
        assert status["state"] == "failed" and "annotate 2 more" in status["message"]
        assert not list(store.project_dir(1).glob(".work-*"))
    finally:
        shapes.stop()


def test_a_stopped_run_writes_no_version_and_one_run_at_a_time(shapes):
    from sam_backend.common.files import file_lock

    store = VersionStore(shapes.trained)
    with file_lock(store.run_lock_path(shapes.project)):
        with pytest.raises(RunInProgress, match="already running"):
            run_training(shapes.settings(), shapes.project)
    assert store.status(shapes.project) == {}  # the refused run wrote nothing
    calls = []

    def stop() -> bool:  # asked to stop once the images are in
        calls.append(1)
        return len(calls) > 12

    with pytest.raises(TrainingStopped):
        run_training(shapes.settings(), shapes.project, stop=stop)
    assert store.versions(shapes.project) == []
    assert store.status(shapes.project)["state"] == "failed"
    assert "asked to stop" in store.status(shapes.project)["message"]
    assert not list(store.project_dir(shapes.project).glob(".work-*"))

