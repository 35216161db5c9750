"""Architecture rules that code review alone would not keep."""

import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "megatron_cropi"


def test_only_parallel_py_touches_megatron_parallel_state():
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "parallel.py" and path.parent == PKG:
            continue
        text = path.read_text()
        if re.search(r"parallel_state|megatron\.core\s+import\s+.*\bmpu\b", text):
            offenders.append(str(path.relative_to(PKG)))
    assert not offenders, f"only megatron_cropi/parallel.py may use megatron.core.parallel_state: {offenders}"


def test_cpu_runtime_is_the_only_cuda_redirect():
    offenders = [
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if p.name != "cpu_runtime.py" and re.search(r"torch\.cuda\.\w+\s*=", p.read_text())
    ]
    assert not offenders, f"torch.cuda is patched outside cpu_runtime.py: {offenders}"


# The layer order of the package, ground floor first. A module may import from its own layer or the
# layers below it, never from above; no two modules (and no two packages) import each other in a circle.
# ``testing`` sits on top: tests and benchmarks build on it, and no production module imports it.
LAYERS = (
    ("utils", "config", "records", "layout"),
    ("cpu_runtime",),
    ("parallel",),
    ("projection", "rewards", "metrics"),
    ("model", "data"),
    ("checkpoint",),
    ("rollout", "popi", "selection"),
    ("influence", "grpo"),
    ("memory", "memory_activations", "memory_capture", "cost", "cost_scale_out", "envcheck", "wiring"),
    ("curriculum",),
    ("run_config",),
    ("dryrun",),
    ("commands",),
    ("api",),
    ("cli",),
    ("testing",),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from the source (every import, lazy ones too)."""
    import ast

    modules = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith(root.name)}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(root.name):
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
        # importing a.b.c runs a/__init__ and a/b/__init__ as well: count the module itself only
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_of(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"megatron_cropi.{package} is in no layer of LAYERS; add it where it belongs")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in graph.items():
        for dst in targets:
            if _package(src) and _package(dst) and _layer_of(_package(dst)) > _layer_of(_package(src)):
                out.append(f"{src} -> {dst}")
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        out.setdefault(_package(src), set()).update(_package(t) for t in targets if _package(t) != _package(src))
    return out


def test_every_package_has_a_layer():
    for module in import_graph():
        if _package(module):
            _layer_of(_package(module))


def test_no_import_runs_up_the_layers():
    bad = upward_imports(import_graph())
    assert not bad, "imports that run up the layers (see LAYERS):\n  " + "\n  ".join(bad)


def test_no_import_cycles_between_modules_or_packages():
    graph = import_graph()
    assert not cycles(graph), f"module import cycles: {cycles(graph)}"
    assert not cycles(package_graph(graph)), f"package import cycles: {cycles(package_graph(graph))}"


def test_production_code_does_not_import_the_test_helpers():
    bad = [f"{s} -> {d}" for s, ts in import_graph().items() for d in ts
           if _package(d) == "testing" and _package(s) != "testing"]
    assert not bad, f"production modules import megatron_cropi.testing: {bad}"


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The rules above are not vacuous: a made-up upward import and a made-up cycle are found."""
    graph = {"megatron_cropi.utils.atomic": {"megatron_cropi.curriculum.controller"},
             "megatron_cropi.curriculum.controller": {"megatron_cropi.curriculum.steps"},
             "megatron_cropi.curriculum.steps": {"megatron_cropi.curriculum.controller"}}
    assert upward_imports(graph) == ["megatron_cropi.utils.atomic -> megatron_cropi.curriculum.controller"]
    assert cycles(graph) == [["megatron_cropi.curriculum.controller", "megatron_cropi.curriculum.steps"]]
