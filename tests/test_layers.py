"""Imports point one way: entry scripts -> algorithms -> data and models -> run infrastructure.

Every module of the project (function-level imports included) may import only modules of its own layer
or a lower one; a test that parses the source, so it runs without importing anything.
"""
import ast
import os

from conftest import ROOT

LAYERS = [  # (layer, path prefixes); the first match wins
    (0, ("utils/run/", "utils/settings.py")),
    (1, ("utils/data/", "models/", "dataloader.py")),
    (2, ("utils/adversarial.py", "utils/autoattack.py", "utils/training.py", "utils/evaluation.py", "utils/attack.py", "utils/figures.py",
         "utils/defenses/")),
    (3, ("config.py", "train_blend.py", "pbe_main.py", "PUD.py", "utils/report.py", "benchmarks/")),
]
NAMES = ["run infrastructure", "data and models", "algorithms", "entry scripts"]


def layer_of(path: str) -> int:
    for layer, prefixes in LAYERS:
        if path.startswith(prefixes):
            return layer
    raise AssertionError(f"{path} is in no layer; add it to LAYERS")


def module_path(name: str) -> str | None:
    """The repository file of an imported module name, or None for a third-party module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        base = os.path.join(*parts[:n])
        for cand in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(os.path.join(ROOT, cand)):
                return cand.replace(os.sep, "/")
    return None


def project_modules():
    skip = {os.path.join(ROOT, d) for d in ("tests", "runs", "data", "docs")}  # top-level folders that hold no module
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and os.path.join(folder, d) not in skip]
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")


def imports(path: str):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)  # from utils.run import distributed


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in project_modules():
        if path.endswith("__init__.py") and path.count("/") == 1 and path.startswith("utils/"):
            continue  # the empty package file
        mine = layer_of(path)
        for name in imports(path):
            target = module_path(name)
            if target is not None and not target.endswith("utils/__init__.py") and layer_of(target) > mine:
                upward.append(f"{path} ({NAMES[mine]}) imports {name} ({NAMES[layer_of(target)]})")
    assert not upward, "\n".join(sorted(set(upward)))


def test_the_layer_map_covers_every_package():
    paths = set(project_modules())
    assert {"utils/data/poison.py", "utils/run/resume.py", "utils/defenses/pud.py", "models/speed.py"} <= paths
    assert layer_of("utils/data/poison.py") == 1 and layer_of(module_path("utils.attack")) == 2
    assert module_path("torch") is None and module_path("utils.run.distributed") == "utils/run/distributed.py"
