"""`sam-backend annotate` on a real Label Studio 1.23.2 project: one prediction per task under the
backend's model_version, checked through Label Studio's API; a second run adds nothing. Also: the
``hint`` attribute that gives a label its phrase is accepted by Label Studio as is."""
from __future__ import annotations

import cv2
import pytest

from sam_backend import cli
from tests.support.random_weights import make_random_grounding_dino
from tests.support.random_weights import synthetic_image

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Car" hint="red car"/><Label value="Person"/></BrushLabels>
  <RectangleLabels name="boxes" toName="image"><Label value="Car" hint="red car"/><Label value="Person"/></RectangleLabels>
</View>"""


@pytest.fixture
def annotate_argv(label_studio, checkpoint_factory, tmp_path, monkeypatch):
    """``sam-backend annotate --project ID`` arguments with Label Studio's address and token in
    the environment, as the backend takes them."""
    dino = make_random_grounding_dino(tmp_path / "gd", "tiny", seed=7)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "image-cache"))

    def argv(project_id, *options):
        return ["annotate", "--project", str(project_id), "--no-progress", "--with",
                "model_name=mobile_sam", f"sam_checkpoint_file={checkpoint_factory('mobile_sam')}",
                "device=cpu", f"concept_checkpoint={dino}", "concept_threshold=0.3", *options]

    return argv


def test_annotate_a_project_then_resume_adds_nothing(label_studio, annotate_argv, tmp_path,
                                                     capsys):
    api = label_studio.api
    project = api.create_project("label by concept", CONFIG)
    assert 'hint="red car"' in api.get_project(project["id"])["label_config"]
    for seed in range(3):
        path = tmp_path / f"scene{seed}.png"
        cv2.imwrite(str(path), synthetic_image(180 + 20 * seed, 240, seed=seed))
        api.import_image(project["id"], path)
    tasks = api.list_tasks(project["id"])
    argv = annotate_argv(project["id"], "concept_model=grounding_dino", "max_instances=3")

    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "3 task(s) annotated" in first and "0 failed" in first
    predictions = api.get("/api/predictions", params={"project": project["id"]})
    assert sorted(p["task"] for p in predictions) == sorted(t["id"] for t in tasks)
    versions = {p["model_version"] for p in predictions}
    assert len(versions) == 1 and versions.pop().endswith("mobile_sam/vit_t+grounding_dino")
    assert all(r["value"][r["type"]][0] in ("Car", "Person")
               for p in predictions for r in p["result"])
    assert any(p["result"] for p in predictions)

    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "0 task(s) annotated" in second and "3 skipped" in second
    assert len(api.get("/api/predictions", params={"project": project["id"]})) == 3


def test_a_failing_task_is_reported_and_the_run_goes_on(label_studio, annotate_argv, tmp_path,
                                                        capsys):
    api = label_studio.api
    project = api.create_project("label by concept, a broken task", CONFIG)
    path = tmp_path / "ok.png"
    cv2.imwrite(str(path), synthetic_image(160, 200, seed=1))
    api.import_image(project["id"], path)
    api.import_tasks(project["id"], [{"data": {"image": "http://127.0.0.1:9/missing.png"}}])
    # concept_model defaults to grounding_dino for this command
    code = cli.main(annotate_argv(project["id"], "max_instances=2"))
    out = capsys.readouterr().out
    assert code == 1
    assert "1 task(s) annotated" in out and "1 failed" in out and "missing.png" in out
    assert len(api.get("/api/predictions", params={"project": project["id"]})) == 1
