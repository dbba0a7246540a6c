"""The layers of ``knet/``: every module is in exactly one, and imports run downwards only.

The table below is the README's layer table. Each module may import modules of its own layer
or of a layer below; never one above (a lazy import inside a function counts too), and no two
modules import each other, even through others. ``pipelines/`` (the Prefect flows) sits above
all of ``knet/``, which never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: (layer, the modules or packages in it).
LAYERS = (
    ("foundations", ("knet.config", "knet.io", "knet.structures", "knet.syncs")),
    ("tracking", ("knet.tracking",)),
    ("data", ("knet.data",)),
    ("model", ("knet.model",)),
    ("method", ("knet.method",)),
    ("evaluation", ("knet.evaluation",)),
    ("training", ("knet.training",)),
    ("experiments", ("knet.experiments",)),
    ("interface", ("knet.cli", "knet.__main__")),
)


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of the layer holding ``module`` (the longest listed prefix wins)."""
    if module == "knet":
        return 0  # the package's empty __init__
    best = None
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            inside = module == member or module.startswith(member + ".")
            if inside and (best is None or len(member) > len(best[1])):
                best = (index, member)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py")
    return best[0]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The knet modules ``path`` imports anywhere in it (``from a import b``: ``a.b`` when
    that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    modules = _modules("knet")
    known = set(modules)
    upward = []
    for name, path in modules.items():
        for imported in imports_of(path, known):
            if layer_of(imported) > layer_of(name):
                upward.append(
                    f"{name} ({LAYERS[layer_of(name)][0]}) imports {imported} "
                    f"({LAYERS[layer_of(imported)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = _modules("knet")
    known = set(modules)
    graph = {name: imports_of(path, known) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [name, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_knet_never_imports_the_flows():
    modules = _modules("knet")
    flows = set(_modules("pipelines"))
    offenders = {name for name, path in modules.items() if imports_of(path, flows)}
    assert not offenders


def test_the_layout_shows_the_layers():
    """A layer of several modules is a sub-package of its own; single modules at the top of
    ``knet/`` are only the foundations, tracking and the command line."""
    top = {_module_name(p) for p in (ROOT / "knet").glob("*.py")} - {"knet"}
    packages = {f"knet.{p.parent.name}" for p in (ROOT / "knet").glob("*/__init__.py")}
    assert top | packages == {member for _, members in LAYERS for member in members}
    for layer, members in LAYERS:
        if len(members) > 1:
            assert layer in ("foundations", "interface"), f"{layer}: make it one sub-package"


def test_moved_modules_keep_their_old_names_and_knet_uses_only_the_new():
    """Registered versions before the layer split import ``knet.registry`` and ``knet.predict``
    in their logged ``mlflow_model.py``: the old names load the very same modules."""
    import importlib

    import knet

    for old, new in knet.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from knet.predict import predict_image, segments_of, semantic_map  # what old versions import
    from knet.registry import load_model_files

    assert callable(load_model_files) and callable(predict_image)
    assert callable(segments_of) and callable(semantic_map)
    users = []
    for package in ("knet", "pipelines", "tests", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name in ("test_layers.py",) or path == ROOT / "knet" / "__init__.py":
                continue
            found = imports_of(path, set(knet.MOVED))
            users += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(found)]
    assert not users, "\n".join(users)


def test_the_documented_layer_table_matches():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for layer, members in LAYERS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {layer} |")), "")
        assert row, f"docs/configuration.md has no row for layer {layer}"
        for member in members:
            path = member.replace(".", "/")
            shown = f"{path}/" if (ROOT / path).is_dir() else f"{path}.py"
            assert f"`{shown}`" in row, f"{member} missing from the {layer} row"


# Functions longer than this many lines, or with more parameters than this, say why in a
# comment in their signature (issue 21: the rooms of the code stay small).
MAX_LINES = 60
MAX_PARAMETERS = 7


def test_long_functions_and_long_signatures_say_why():
    unexplained = []
    for package in ("knet", "pipelines"):
        for name, path in _modules(package).items():
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                count += (args.vararg is not None) + (args.kwarg is not None)
                if args.args and args.args[0].arg in ("self", "cls"):
                    count -= 1
                length = node.end_lineno - node.lineno + 1
                signature = lines[node.lineno - 1 : node.body[0].lineno - 1]
                if (length > MAX_LINES or count > MAX_PARAMETERS) and not any(
                    "#" in line for line in signature
                ):
                    unexplained.append(f"{name}.{node.name}: {length} lines, {count} parameters")
    assert not unexplained, "\n".join(unexplained)
