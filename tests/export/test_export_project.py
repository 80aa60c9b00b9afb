"""``--project ID``: the exporters read a project from Label Studio's API (the one client,
:mod:`sam_backend.labelstudio.api`) instead of its JSON export file, and the objects are the same.
The same tasks are written as an export file and served by the loopback stand-in of Label
Studio's API (which, as Label Studio, leaves annotations out unless asked for ``fields=all``)."""
from __future__ import annotations

import json

import pytest

from sam_backend import cli
from tests.support.export_data import answer, block, disc, write_export
from tests.support.team_utils import API_TOKEN, FakeLabelStudioAPI

# pycocotools 2.0.x calls np.array(copy=False) when decoding; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def project_regions():
    """{task id: regions}, {task id: (w, h)}: brush + polygons + box per object (one object
    each), two labels, a box-only object, a task without regions."""
    regions = {
        1: answer(disc(48, 64, 20, 20, 10), "cat") + answer(block(48, 64, 40, 25, 60, 45), "dog"),
        2: answer(disc(30, 40, 15, 15, 8), "dog", polygons=False),
        3: [],
    }
    return regions, {1: (64, 48), 2: (40, 30), 3: (32, 32)}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """(the export file, the stand-in serving the same tasks plus what the file leaves out: an
    unlabelled task and a cancelled annotation)."""
    regions, sizes = project_regions()
    export = write_export(tmp_path, monkeypatch, regions, sizes)
    tasks = json.loads(export.read_text())
    tasks[1]["annotations"].append({"id": 99, "was_cancelled": True,
                                    "result": answer(disc(30, 40, 5, 5, 3), "cat")})
    tasks[1]["predictions"] = [{"id": 7, "result": answer(disc(30, 40, 30, 20, 4), "cat")}]
    export.write_text(json.dumps(tasks))
    served = tasks + [{"id": 4, "data": {"image": "/data/local-files/?d=img1.png"},
                       "annotations": [], "predictions": []}]
    api = FakeLabelStudioAPI(CONFIG, served)
    yield export, api
    api.stop()


def coco_of(out_dir):
    return json.loads((out_dir / "annotations" / "ann.json").read_text())


def test_a_project_read_from_the_api_exports_the_same_coco_as_its_export_file(
        project, tmp_path, capsys):
    export, api = project
    assert cli.main(["export-coco", "--json_file_path", str(export),
                     "--out_dir", str(tmp_path / "from_file")]) == 0
    assert cli.main(["export-coco", "--project", str(api.project), "--url", api.url,
                     "--token", API_TOKEN, "--out_dir", str(tmp_path / "from_api")]) == 0
    from_file, from_api = coco_of(tmp_path / "from_file"), coco_of(tmp_path / "from_api")
    assert from_api["annotations"] == from_file["annotations"]
    assert from_api["images"] == from_file["images"]
    assert from_api["categories"] == from_file["categories"] == [
        {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    # one object = one annotation: three objects, whatever regions describe them
    assert len(from_api["annotations"]) == 3
    for name in ("img1.png", "img2.png", "img3.png"):
        assert ((tmp_path / "from_api" / "images" / name).read_bytes()
                == (tmp_path / "from_file" / "images" / name).read_bytes())
    pages = [r for r in api.requests if r.startswith("/api/tasks")]
    assert len(pages) == 1 and "fields=all" in pages[0] and "resolve_uri=false" in pages[0]


def test_yolo_from_the_api_matches_the_export_file(project, tmp_path, monkeypatch):
    export, api = project
    monkeypatch.setenv("LABEL_STUDIO_URL", api.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_TOKEN)
    assert cli.main(["export-yolo", "--json_file_path", str(export),
                     "--out_dir", str(tmp_path / "file")]) == 0
    assert cli.main(["export-yolo", "--project", str(api.project),
                     "--out_dir", str(tmp_path / "api")]) == 0
    for name in ("img1.txt", "img2.txt", "img3.txt"):
        assert ((tmp_path / "api" / "labels" / name).read_text()
                == (tmp_path / "file" / "labels" / name).read_text())


def test_project_errors_are_clear(project, tmp_path, caplog):
    _, api = project
    out = str(tmp_path / "out")
    assert cli.main(["export-coco", "--project", "9", "--url", api.url, "--token", API_TOKEN,
                     "--out_dir", out]) == 2
    assert "HTTP 404" in caplog.text and "/api/tasks" in caplog.text
    caplog.clear()
    assert cli.main(["export-coco", "--project", "1", "--url", api.url, "--token", "0" * 40,
                     "--out_dir", out]) == 2
    assert "refused /api/tasks" in caplog.text and "LABEL_STUDIO_API_KEY" in caplog.text
    caplog.clear()
    assert cli.main(["export-coco", "--project", "1", "--out_dir", out]) == 2
    assert "LABEL_STUDIO_URL" in caplog.text


def test_a_file_or_a_project_not_both(project, tmp_path, capsys):
    export, _ = project
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export-coco", "--json_file_path", str(export), "--project", "1",
                  "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export-yolo", "--out_dir", str(tmp_path / "out")])
    assert "--json_file_path" in capsys.readouterr().err
