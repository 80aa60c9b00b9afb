"""``sam-backend annotate`` takes its options and Label Studio's address and token the way the
backend does: ``--with`` / ``--option`` flags over the environment over defaults (Settings), the
image options (here ``local_files_document_root``) reaching the image loader, ``--url`` over
``LABEL_STUDIO_URL``. Against a loopback stand-in of Label Studio's API; random weights of the real
Grounding DINO and MobileSAM architectures."""
from __future__ import annotations

import cv2
import pytest

from tests.support.random_weights import synthetic_image
from sam_backend import cli
from tests.support.random_weights import make_random_grounding_dino
from tests.support.server_utils import free_port
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Car" hint="red car"/></BrushLabels>
</View>"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Two tasks whose images are local files under ``tmp_path/docs``; the environment names a
    Label Studio where nothing listens, and no local-files root."""
    docs = tmp_path / "docs"
    docs.mkdir()
    tasks = []
    for task_id in (1, 2):
        path = docs / f"scene{task_id}.png"
        cv2.imwrite(str(path), synthetic_image(160, 200 + 20 * task_id, seed=task_id))
        tasks.append({"id": task_id, "data": {"image": str(path)}})
    api = FakeLabelStudioAPI(CONFIG, tasks)
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_TOKEN)
    monkeypatch.setenv("SAM_BACKEND_IMAGE_CACHE_DIR", str(tmp_path / "image-cache"))
    for name in ("LOCAL_FILES_DOCUMENT_ROOT", "CONCEPT_MODEL", "MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield api, docs
    api.stop()


def argv(api, docs, checkpoint, dino):
    return ["annotate", "--project", str(api.project), "--url", api.url, "--no-progress",
            "--with", "model_name=mobile_sam", f"sam_checkpoint_file={checkpoint}", "device=cpu",
            f"concept_checkpoint={dino}", "--concept_threshold", "0.3",
            "--local_files_document_root", str(docs)]


def test_annotate_reads_the_backend_settings_and_url_flag(project, checkpoint_factory, tmp_path,
                                                         monkeypatch, capsys):
    api, docs = project
    dino = make_random_grounding_dino(tmp_path / "gd", "tiny", seed=7)
    args = argv(api, docs, checkpoint_factory("mobile_sam"), dino)

    # concept_model comes from the command's default (grounding_dino); the local images are read
    # because local_files_document_root, a backend option, reaches the image loader
    assert cli.main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "2 task(s) annotated" in out and "0 failed" in out
    assert sorted(p["task"] for p in api.predictions) == [1, 2]
    assert {p["model_version"].rsplit(":", 1)[1] for p in api.predictions} == {
        "mobile_sam/vit_t+grounding_dino"}

    # the environment beats the command's default, as for every option of the backend
    monkeypatch.setenv("CONCEPT_MODEL", "sam3")
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "2 failed" in out and "concept_model=sam3 needs model_name=sam3" in out
    assert len(api.predictions) == 2
