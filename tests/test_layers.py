"""The package's layers, as the tree shows them and docs/architecture.md describes them.

Every ``import`` and ``from ... import`` in ``sam2_refine/`` is read with :mod:`ast` (also the
deferred ones inside functions and under ``TYPE_CHECKING``: a deferred import hides a circle, it
does not remove it) and checked against the rules below:

- each module imports only the modules its layer may import (:data:`MAY_IMPORT`): nothing runs
  upward, and the engine sees the model only through its predictor protocol and logits;
- no import circle between modules;
- torch and sam2 are imported only in the model layer's two modules that run them;
- no ``__init__.py`` imports anything (``--request interface`` stays free of torch, and a
  monkeypatch names the one module that runs the code);
- no module is longer than :data:`MAX_LINES`, except those in :data:`LONG_MODULES` with the reason;
- the old flat modules are gone (no compatibility shims);
- imports are absolute (``from sam2_refine.engine import geometry``): the path names the layer.

The checker is a function of a directory, so the tests at the end run it on small made-up
packages and show that each rule fails when broken.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sam2_refine"

#: What each layer may import of the package (its own modules always). A module's layer is its
#: sub-package, or for a top-level module its own name.
BASE = ("fields", "annotations", "messages", "worker_info")
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    # underneath: the form's vocabulary, the shared nouns, the user's sentences, the image's facts
    "fields": (),
    "annotations": (),
    "messages": (),
    "worker_info": (),
    # speaks NimbusImage
    "nimbus": ("messages",),
    # SAM2 (a sidecar's tuned defaults are form values)
    "model": ("fields", "worker_info"),
    # one location, no server: the model only through its protocol and the logits' helpers
    "engine": ("annotations", "model.predictor", "model.logits"),
    # one job
    "job": ("engine", "model", "nimbus", *BASE),
    # on top
    "interface": ("model", *BASE),
    "cli": ("interface", "job", "model", "nimbus", *BASE),
    "demo": ("cli", "job", "engine", "model", "nimbus", "testing", *BASE),
    # the test doubles may use any production layer; production never imports them (demo aside)
    "testing": ("job", "engine", "model", "nimbus", *BASE),
}

#: The only modules that import torch or sam2 (``testing`` builds random-weight checkpoints).
TORCH_MODULES = {"model.sam2_model", "model.fast_decoder", "model.loading", "testing.checkpoints",
                 "testing.sam2_layouts"}

MAX_LINES = 600
#: Modules allowed to be longer, each because one class is the job.
LONG_MODULES = {
    # FastBoxDecoder: sam2's mask decoder rewritten around one image's precomputed tensors; its
    # stages share those tensors and the token layout, so they stay one class.
    "model.fast_decoder": 900,
    # NimbusClient: one method per NimbusImage endpoint the worker calls, around one session.
    "nimbus.client": 700,
    # NimbusTestServer: the test double of the server, one route per endpoint, one store.
    "testing.nimbus_server": 1150,
}

#: Flat modules of the package before the layers (no shim may stay at these paths).
OLD_MODULES = ("refine", "job", "nimbus_client", "sam2_model", "fast_decoder", "checkpoints",
               "settings", "report", "converge", "geometry", "imaging", "selection", "predictor",
               "logits", "frame_decoding", "views", "cpu_precision", "replace", "markers")


@dataclass(frozen=True)
class Violation:
    module: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.module}: {self.rule}: {self.detail}"


def module_name(path: Path, root: Path) -> str:
    """``engine/objects.py`` -> ``engine.objects``; ``engine/__init__.py`` -> ``engine``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, package: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(modules of the package this tree imports, other top-level packages it imports). ``from
    sam2_refine.engine import geometry`` counts as ``engine.geometry`` when that is a module."""
    inner: set[str] = set()
    outer: set[str] = set()

    def add(name: str) -> None:
        if name == package:
            inner.add("")
        elif name.startswith(package + "."):
            inner.add(name[len(package) + 1:])
        else:
            outer.add(name.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are refused by check(): the path says the layer
                inner.add("." * node.level + (node.module or ""))
                continue
            source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                if candidate.startswith(package + ".") and candidate[len(package) + 1:] in modules:
                    add(candidate)
                else:
                    add(source)
    inner.discard("")
    return inner, outer


def layer_of(module: str) -> str:
    return module.split(".")[0]


def allowed(importer: str, target: str) -> bool:
    """May ``importer`` import ``target`` (both package-relative dotted names)?"""
    layer = layer_of(importer)
    if layer_of(target) == layer:
        return True
    for rule in MAY_IMPORT.get(layer, ()):
        if target == rule or target.startswith(rule + "."):
            return True
    return False


def check(root: Path, package: str = "sam2_refine") -> list[Violation]:
    """Every rule of this module's docstring, on the package at ``root``."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    found: list[Violation] = []
    for module, path in files.items():
        text = path.read_text()
        tree = ast.parse(text, str(path))
        inner, outer = imported(tree, package, modules)
        graph[module] = {target for target in inner if target in modules}
        if path.name == "__init__.py" and (inner or outer):
            found.append(Violation(module or package, "an __init__.py imports", ", ".join(sorted(inner | outer))))
        for target in sorted(inner):
            if target.startswith("."):
                found.append(Violation(module, "a relative import", target))
            elif module and not allowed(module, target):
                found.append(Violation(module, "imports a layer it may not", target))
        if {"torch", "sam2"} & outer and module not in TORCH_MODULES:
            found.append(Violation(module, "imports torch or sam2 outside the model layer",
                                   ", ".join(sorted({"torch", "sam2"} & outer))))
        lines = text.count("\n")
        if lines > LONG_MODULES.get(module, MAX_LINES):
            found.append(Violation(module, "is too long", f"{lines} lines"))
    found.extend(Violation(" -> ".join(cycle), "import circle", "") for cycle in circles(graph))
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself),
    each as a sorted list (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    out.append(sorted(component))
    return out


# -- the package as it is ----------------------------------------------------------------------


def test_the_package_keeps_its_layers() -> None:
    violations = check(PACKAGE)
    assert not violations, "\n".join(map(str, violations))


def test_every_layer_is_known_and_says_what_it_may_import() -> None:
    """A new sub-package or top-level module needs its rule here; each package's __init__.py
    states its job and its imports in words."""
    layers = {layer_of(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")} - {""}
    assert layers <= set(MAY_IMPORT), sorted(layers - set(MAY_IMPORT))
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 15, f"{init} has no description of its layer"
        if init.parent.name != "testing":
            assert "May import" in doc, f"{init} does not say what its layer may import"


def test_no_compatibility_shims_at_the_old_paths() -> None:
    left = [name for name in OLD_MODULES if (PACKAGE / f"{name}.py").exists()]
    assert not left, left


def test_the_interface_request_and_the_engine_import_no_torch() -> None:
    """Run in a fresh interpreter: importing the interface form, the engine's location and the
    job's compute module loads neither torch nor sam2 (the model loads them when a job needs it)."""
    import subprocess
    import sys

    code = ("import sys; import sam2_refine.interface, sam2_refine.engine.location, sam2_refine.job.compute, "
            "sam2_refine.cli; bad = sorted(m for m in ('torch', 'sam2') if m in sys.modules); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_engine_loads_no_settings_parser_form_or_catalogue() -> None:
    import subprocess
    import sys

    code = ("import sys; import sam2_refine.engine.location; "
            "print(sorted(m for m in sys.modules if m.startswith('sam2_refine.') and "
            "m != 'sam2_refine.model' and not m.startswith(('sam2_refine.engine', "
            "'sam2_refine.model.predictor', 'sam2_refine.model.logits', 'sam2_refine.annotations'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the checker fails when a rule is broken -----------------------------------------------------


def make_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "sam2_refine"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


GOOD = {
    "fields.py": "X = 1\n",
    "engine/__init__.py": "",
    "engine/objects.py": "from sam2_refine.model.predictor import P\nfrom sam2_refine.engine import shapes\n",
    "engine/shapes.py": "import numpy\n",
    "model/__init__.py": "",
    "model/predictor.py": "from sam2_refine import fields\n",
    "model/sam2_model.py": "import torch\nfrom sam2_refine.model import predictor\n",
    "job/__init__.py": "",
    "job/compute.py": "from sam2_refine.engine.objects import f\nfrom sam2_refine.nimbus import client\n",
    "nimbus/__init__.py": "",
    "nimbus/client.py": "import requests\n",
}


def rules(violations: list[Violation]) -> list[tuple[str, str]]:
    return sorted((v.module, v.rule) for v in violations)


def test_checker_passes_a_package_that_keeps_the_rules(tmp_path: Path) -> None:
    assert check(make_package(tmp_path, GOOD)) == []


def test_checker_finds_an_upward_import(tmp_path: Path) -> None:
    """The engine importing the job (also deferred, inside a function) is caught, and the circle it
    closes (the job imports the engine) too."""
    files = {**GOOD, "engine/shapes.py": "def f():\n    from sam2_refine.job import compute\n"}
    assert rules(check(make_package(tmp_path, files))) == [
        ("engine.objects -> engine.shapes -> job.compute", "import circle"),
        ("engine.shapes", "imports a layer it may not")]


def test_checker_finds_the_engine_reaching_past_the_predictor(tmp_path: Path) -> None:
    files = {**GOOD, "engine/shapes.py": "from sam2_refine.model import sam2_model\n"}
    assert rules(check(make_package(tmp_path, files))) == [("engine.shapes", "imports a layer it may not")]


def test_checker_finds_a_circle_hidden_by_a_deferred_import(tmp_path: Path) -> None:
    """settings -> checkpoints -> settings, the circle the flat package had, hidden by a deferred
    import, is still a circle."""
    files = {**GOOD, "job/settings.py": "from sam2_refine.job import catalogue\n",
             "job/catalogue.py": "def f():\n    from sam2_refine.job.settings import S\n"}
    found = check(make_package(tmp_path, files))
    assert [(v.module, v.rule) for v in found] == [("job.catalogue -> job.settings", "import circle")]


def test_checker_finds_torch_outside_the_model(tmp_path: Path) -> None:
    files = {**GOOD, "engine/shapes.py": "import torch.nn\n"}
    assert rules(check(make_package(tmp_path, files))) == [
        ("engine.shapes", "imports torch or sam2 outside the model layer")]


def test_checker_finds_an_init_that_imports(tmp_path: Path) -> None:
    files = {**GOOD, "engine/__init__.py": "from sam2_refine.engine.objects import f\n"}
    assert rules(check(make_package(tmp_path, files))) == [("engine", "an __init__.py imports")]


def test_checker_finds_a_long_module(tmp_path: Path) -> None:
    files = {**GOOD, "engine/shapes.py": "x = 1\n" * (MAX_LINES + 1)}
    assert rules(check(make_package(tmp_path, files))) == [("engine.shapes", "is too long")]


@pytest.mark.parametrize("source", ["from sam2_refine.fields import X", "from sam2_refine import fields",
                                    "import sam2_refine.fields"])
def test_checker_reads_every_form_of_import(tmp_path: Path, source: str) -> None:
    """``nimbus`` may not import ``fields``, however the import is spelled."""
    files = {**GOOD, "nimbus/client.py": source + "\n"}
    assert rules(check(make_package(tmp_path, files))) == [("nimbus.client", "imports a layer it may not")]


def test_checker_finds_a_relative_import(tmp_path: Path) -> None:
    files = {**GOOD, "engine/objects.py": "from .shapes import f\n"}
    assert rules(check(make_package(tmp_path, files))) == [("engine.objects", "a relative import")]
