"""The package's folders form layers, each importing only the layers below it (README
"Architecture"). A static walk: every module of ``sam_backend`` is parsed, every import is
collected (those inside functions too: a lazy import is still a dependency) and mapped to the
folder, or top-level module, it names. Fails on any cycle between folders and on any import from a
lower layer into a higher one.

Imports under ``if TYPE_CHECKING:`` are skipped: they never run, and only name the type of an
object the module is handed (e.g. the image layer reading the fields of the ``Settings`` it is
given).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "sam_backend"

# lowest first; a layer may import the layers before it, never one after it. Keep in step with
# README "Architecture".
LAYERS: List[str] = [
    "__init__",     # the package's version string
    "errors",       # the exception classes
    "common",       # limits, deadlines, file locks, option parsing
    "models",       # one runtime per family behind embed/decode
    "images",       # task image -> RGB array
    "embeddings",   # the segmenter, memory LRU, shared store, encode queue
    "concepts",     # concept engines and the concept pass
    "video",        # clips, trackers, tracks
    "labelstudio",  # label config, prompts, regions, the prediction service, the API client
    "settings",     # every option, read once, validated with each layer's own parser
    "assembly",     # builds everything from Settings
    "export",       # offline exporters (commands)
    "training",     # training set from annotations, held-out split, evaluation
    "server",       # the HTTP layer and `serve`
    "commands",     # the other commands: worker, precompute, annotate, weights
    "cli",          # `sam-backend`
]
RANK = {name: index for index, name in enumerate(LAYERS)}

Import = Tuple[str, int, str]  # (module file, line, imported name)


def part_of(dotted: str) -> str:
    """The layer a dotted ``sam_backend...`` name belongs to: its folder or top-level module."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _type_checking_lines(tree: ast.AST) -> Set[int]:
    lines: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                or isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"):
            for child in node.body:
                for inner in ast.walk(child):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def imports_of(path: Path) -> List[Import]:
    """Every ``sam_backend`` name ``path`` imports (relative imports resolved)."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(relative.parts)
    package = module[:-len(".__init__")] if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skipped = _type_checking_lines(tree)
    found: List[Import] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            prefix = ".".join(base)
            names = ([f"{prefix}.{node.module}"] if node.module
                     else [f"{prefix}.{alias.name}" for alias in node.names])
        elif node.module == "sam_backend":  # from sam_backend import x: x's folder or module
            names = [f"sam_backend.{alias.name}" for alias in node.names]
        else:
            names = [node.module]
        found += [(str(relative) + ".py", node.lineno, name) for name in names
                  if name == "sam_backend" or name.startswith("sam_backend.")]
    return found


def folder_edges() -> Dict[Tuple[str, str], List[Import]]:
    edges: Dict[Tuple[str, str], List[Import]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for imported in imports_of(path):
            target = part_of(imported[2])
            if target == "__version__":
                target = "__init__"
            if target != source:
                edges.setdefault((source, target), []).append(imported)
    return edges


def _shown(imports: List[Import]) -> str:
    return "; ".join(f"{file}:{line} imports {name}" for file, line, name in imports[:3])


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts))
             for p in PACKAGE.rglob("*.py")}
    assert parts - set(LAYERS) == set(), "add the new folder or module to LAYERS (and the README)"


def test_no_cycle_between_folders():
    edges = folder_edges()
    graph: Dict[str, Set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    cycles = []
    for (source, target), imports in sorted(edges.items()):
        # the way back from target to source, if there is one: then this import is on a cycle
        parents: Dict[str, str] = {target: ""}
        todo = [target]
        while todo and source not in parents:
            node = todo.pop(0)
            for nxt in sorted(graph.get(node, ())):
                if nxt not in parents:
                    parents[nxt] = node
                    todo.append(nxt)
        if source in parents:
            back, node = [], source
            while node:
                back.append(node)
                node = parents[node]
            cycle = " -> ".join([source] + back[::-1])
            cycles.append(f"{cycle}: {_shown(imports)}")
    assert not cycles, "imports on a cycle between folders (the cycle, then the import):\n" + "\n".join(cycles)


def test_no_layer_imports_a_higher_one():
    upward = [f"{source} -> {target}: {_shown(imports)}"
              for (source, target), imports in sorted(folder_edges().items())
              if source in RANK and target in RANK and RANK[target] > RANK[source]]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)
