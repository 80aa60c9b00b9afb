"""The exporters stay off the request path: nothing the server runs imports ``sam_backend.export``,
neither at import time (a fresh interpreter that imports the server app and every module of the
request-path packages holds no ``sam_backend.export`` module) nor lazily inside a function (no
import statement names it)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sam_backend"
#: what the server runs: every package but the exporters and the command line
REQUEST_PATH = ["server", "labelstudio", "models", "embeddings", "images", "concepts", "common"]


def _imported_modules(path: Path, root: Path = ROOT):
    """(line, module) of every import statement in ``path`` (a file below ``root``), relative
    ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # from sam_backend import export
                yield node.lineno, f"{base}.{alias.name}"


def test_no_request_path_module_imports_the_exporters():
    files = [p for name in REQUEST_PATH for p in sorted((PACKAGE / name).rglob("*.py"))]
    files += [PACKAGE / "__init__.py", PACKAGE / "settings.py", PACKAGE / "errors.py",
              PACKAGE / "assembly.py",
              ROOT / "sam" / "_wsgi.py"]
    assert len(files) > 30
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in files for line, module in _imported_modules(path)
             if module == "sam_backend.export" or module.startswith("sam_backend.export.")]
    assert found == []


def test_the_checker_sees_an_import_of_the_exporters(tmp_path):
    """The static check above finds lazy, aliased and relative imports."""
    path = tmp_path / "sam_backend" / "labelstudio" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text("def f():\n    from sam_backend.export.coco import export_coco\n"
                    "def g():\n    import sam_backend.export.yolo as y\n"
                    "from ..export import convert\nfrom sam_backend import export\n")
    modules = {m for _, m in _imported_modules(path, tmp_path)}
    assert {"sam_backend.export.coco", "sam_backend.export.yolo", "sam_backend.export.convert",
            "sam_backend.export"} <= modules


@pytest.mark.process
def test_a_fresh_server_process_holds_no_exporter_module():
    code = """
import importlib, json, pkgutil, sys
import sam_backend.server.app
for name in %r:
    package = importlib.import_module("sam_backend." + name)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
""" % (REQUEST_PATH,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert "sam_backend.server.app" in modules and "sam_backend.labelstudio.service" in modules
    assert [m for m in modules if m == "sam_backend.export" or m.startswith("sam_backend.export.")
            ] == []
    # the exporters' own dependencies stay out of the server too
    assert not {"pycocotools", "mmengine"} & {m.split(".")[0] for m in modules}
