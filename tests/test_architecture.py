"""The layering STYLE.md and ARCHITECTURE.md ask for, checked on the source (an AST walk).

Imports run one way: load -> trace -> capture/store -> analyses -> figures/report/CLI.
The analyses (``hooks``, ``probes``, ``circuits``) never import what sits above them nor
the zoo (a model's task reaches them through ``model.task``); modules import each other at
module level with no cycle; private names stay in their module; no package attribute
hides a submodule of the same name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"thinklens": ROOT / "thinklens", "thinklens.hooks": ROOT / "hooks",
           "thinklens.probes": ROOT / "probes", "thinklens.circuits": ROOT / "circuits"}
ANALYSES = ("thinklens.hooks", "thinklens.probes", "thinklens.circuits")
ABOVE = ("thinklens.cli", "thinklens.plots", "thinklens.figures", "thinklens.report",
         "thinklens.zoo", "thinklens.jobs", "thinklens.theme")
# function-level imports allowed in library code: heavy or optional third-party modules only
LAZY_OK = ("kaleido", "transformers", "sklearn", "torch.distributed", "gguf", "choreographer",
           "plotly.io", "vllm", "IPython", "accelerate", "safetensors")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if pkg == "thinklens" and rel.parts[0] in ("hooks", "probes", "circuits"):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int, bool]]:
    """(module, imported names, line, at module level) for each import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` and try/except blocks at the top count as top
        if isinstance(node, ast.If | ast.Try):
            top |= {id(n) for n in ast.walk(node)}
    base = name if _is_package(name) else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                up = base.split(".")
                up = up[: len(up) - (node.level - 1)]
                mod = ".".join(up + ([mod] if mod else []))
            out.append((mod, [a.name for a in node.names], node.lineno, id(node) in top))
    return out


def _targets(mod: str, names: list[str]) -> list[str]:
    """The thinklens modules an import statement loads (``from pkg import sub`` included)."""
    got = [mod] if mod in MODULES else []
    got += [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    return got


def test_the_source_tree_was_found():
    assert {"thinklens.hooks.capture", "thinklens.probes.sweeps", "thinklens.circuits.patching",
            "thinklens.cli", "thinklens.zoo.registry"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(ANALYSES)))
def test_analyses_import_nothing_above_them_nor_the_zoo(name):
    bad = [f"line {line}: {mod}" for mod, names, line, _ in _imports(name)
           for t in [mod, *(f"{mod}.{n}" for n in names)]
           if t.startswith(ABOVE) and (t == mod or t in MODULES)]
    text = MODULES[name].read_text()
    bad += [f"uses {a}.…" for a in ABOVE if _uses_attribute(text, a)]
    assert not bad, f"{name} imports what sits above the analyses: {bad}"


def _uses_attribute(text: str, dotted: str) -> bool:
    """``thinklens.zoo.x`` used as code (not in a docstring or comment)."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                full = ".".join([cur.id, *reversed(parts)])
                if full.startswith(dotted):
                    return True
    return False


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from thinklens.zoo.task import problem_from_prompt\n")
    monkeypatch.setitem(MODULES, "thinklens.hooks.bad", fake)
    with pytest.raises(AssertionError, match="thinklens.zoo.task"):
        test_analyses_import_nothing_above_them_nor_the_zoo("thinklens.hooks.bad")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(ANALYSES)))
def test_analyses_import_thinklens_at_module_level(name):
    lazy = [f"line {line}: {mod}" for mod, names, line, top in _imports(name)
            if not top and (mod == "thinklens" or mod.startswith("thinklens."))]
    assert not lazy, f"{name} imports thinklens modules inside functions (a hidden cycle?): {lazy}"


def _graph() -> dict[str, set[str]]:
    """Module-level imports between thinklens modules, packages' ``__init__`` left out."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES if not _is_package(m)}
    for name in graph:
        for mod, names, _, top in _imports(name):
            if top:
                graph[name] |= {t for t in _targets(mod, names) if not _is_package(t)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_private_names_stay_in_their_module(name):
    bad = [f"line {line}: from {mod} import {n}" for mod, names, line, _ in _imports(name)
           if mod.startswith("thinklens") for n in names
           if n.startswith("_") and not n.startswith("__") and f"{mod}.{n}" not in MODULES]
    assert not bad, f"{name} imports private names of other modules: {bad}"


@pytest.mark.parametrize("pkg", sorted(m for m in MODULES if _is_package(m)))
def test_no_package_attribute_hides_its_submodule(pkg):
    import importlib

    module = importlib.import_module(pkg)
    hidden = [n for n in getattr(module, "__all__", []) if f"{pkg}.{n}" in MODULES
              and not _is_module(getattr(module, n))]
    assert not hidden, f"{pkg}.{hidden[0]} is a function or class that hides the module " \
                       f"{pkg}.{hidden[0]}"


def _is_module(obj) -> bool:
    import types
    return isinstance(obj, types.ModuleType)


def _declared_all(name: str) -> list[str] | None:
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _is_package(m)))
def test_every_public_name_is_declared(name):
    """A module's surface is its ``__all__``: whatever else it defines is ``_private``."""
    tree = ast.parse(MODULES[name].read_text())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)
               and not n.name.startswith("_")]
    declared = _declared_all(name) or []
    loose = [d for d in defined if d not in declared]
    assert not loose, f"{name} defines public names missing from its __all__: {loose}"
    missing = [d for d in declared if d not in {*defined, *_assigned(tree), *_imported(tree)}]
    assert not missing, f"{name}.__all__ lists names it does not have: {missing}"


def _assigned(tree: ast.Module) -> set[str]:
    out = set()
    for n in tree.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] \
            if isinstance(n, ast.AnnAssign) else []
        for t in targets:
            out |= {e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                    if isinstance(e, ast.Name)}
    return out


def _imported(tree: ast.Module) -> set[str]:
    return {(a.asname or a.name).split(".")[0] for n in tree.body
            if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_between_modules_use_declared_names(name):
    bad = []
    for mod, names, line, _ in _imports(name):
        if mod not in MODULES or _is_package(mod):
            continue
        declared = _declared_all(mod) or []
        bad += [f"line {line}: {mod}.{n}" for n in names
                if n not in declared and f"{mod}.{n}" not in MODULES and n != "*"]
    assert not bad, f"{name} imports names their module does not declare in __all__: {bad}"


def _annotation_dims(name: str) -> list[tuple[int, str]]:
    """(line, dim) of every jaxtyping shape string in module ``name``."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
                node.value.id in ("Float", "Int", "Bool", "Shaped", "Num", "Real", "Integer"):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else []
            if len(elts) == 2 and isinstance(elts[1], ast.Constant) and \
                    isinstance(elts[1].value, str):
                out += [(node.lineno, d) for d in elts[1].value.split()]
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_shape_annotations_use_the_axis_vocabulary(name):
    from thinklens.hooks.axes import AXES

    bad = [f"line {line}: {d!r}" for line, d in _annotation_dims(name)
           if not (d.lstrip("*#") in AXES or d.isdigit() or d in ("...", "*axes"))]
    assert not bad, f"{name} uses axis names outside thinklens.hooks.axes.AXES: {bad}"


def test_captured_axes_use_the_axis_vocabulary(organism):
    from thinklens.hooks.axes import AXES

    trace = organism.think("a = 7 ; b = a + 2 ; ? b", max_new_tokens=24)
    cap = organism.capture(trace, sites="blocks.0.*", attention="sentence", progress=False)
    names = {a for key in cap.keys for a in cap[key].axes}
    assert names - set(AXES) == set(), names - set(AXES)
