"""The package DAG of docs/architecture.md, checked on the source: every import (at module
level, inside a function or under TYPE_CHECKING) points down the table below, no two
modules import each other through any chain, and no module imports another's private name.
Read with ast only: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Room -> the rooms it may import (besides itself). Bottom first.
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "base": set(),  # version, errors, config, paths, units, recipe, settings, sampling_params
    "layers": {"base", "kernels"},
    "models": {"base", "kernels", "layers"},
    "engine": {"base", "layers", "models"},
    "llm": {"base", "engine"},
    "eval": {"base", "layers", "models", "engine", "llm"},
    "quant": {"base", "kernels", "layers", "models", "engine", "llm", "eval"},
    "serve": {"base", "models", "engine", "llm"},
    "bench": {"base", "kernels", "layers", "models", "engine", "llm", "eval", "serve"},
    "cli": {"base", "kernels", "layers", "models", "engine", "llm", "eval", "quant", "serve", "bench"},
    "api": {"base", "llm"},  # llmctl/__init__: `from llmctl import LLM, SamplingParams`; nothing imports it
}
_PACKAGES = {"layers", "models", "engine", "eval", "quant", "serve", "bench", "cli"}
_BASE = {"llmctl.version", "llmctl.errors", "llmctl.config", "llmctl.paths", "llmctl.recipe", "llmctl.settings",
         "llmctl.sampling_params", "llmctl.units"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in (("llmctl", "llmctl"), ("llmctl_kernels", "llmctl_kernels")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "llmctl_kernels":
        return "kernels"
    if module in _BASE:
        return "base"
    if module == "llmctl":
        return "api"
    if module in ("llmctl.llm",):
        return "llm"
    if module == "llmctl.__main__":
        return "cli"
    if len(parts) > 1 and parts[1] in _PACKAGES:
        return parts[1]
    raise AssertionError(f"{module}: not in the layering table; add it to tests/test_layering.py and docs/architecture.md")


def _imports(module: str, source: str, is_package: bool, mods: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names) for every import of our packages in `source`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            out.append((target, node.lineno, names))
            # `from pkg import submodule` is an arrow to the submodule.
            out += [(f"{target}.{n}", node.lineno, []) for n in names if f"{target}.{n}" in mods]
    return [(t, line, names) for t, line, names in out if t.split(".")[0] in ("llmctl", "llmctl_kernels")]


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, list[str]]]]]:
    mods = _modules()
    return mods, {m: _imports(m, p.read_text(), p.name == "__init__.py", mods) for m, p in mods.items()}


def test_the_room_table_is_a_dag():
    seen: dict[str, int] = {}

    def depth(r: str, stack: tuple[str, ...] = ()) -> int:
        assert r not in stack, f"cycle in ALLOWED: {' -> '.join((*stack, r))}"
        if r not in seen:
            seen[r] = 1 + max((depth(d, (*stack, r)) for d in ALLOWED[r]), default=0)
        return seen[r]

    for r in ALLOWED:
        depth(r)


def test_every_import_points_down():
    mods, graph = _graph()
    upward = [line for module, imports in graph.items() for line in _upward(module, imports, mods)]
    assert not upward, "imports against the layering table:\n" + "\n".join(upward)


def test_no_module_cycle():
    mods, graph = _graph()
    edges = {m: {t for t, _, _ in imports if t in mods and t != m} for m, imports in graph.items()}
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
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
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert not cycles, f"modules that import each other (through a chain): {cycles}"


def test_no_private_name_crosses_modules():
    mods, graph = _graph()
    private = [f"{mods[m].relative_to(ROOT)}:{line}: {target}.{name}"
               for m, imports in graph.items() for target, line, names in imports
               for name in names if target != m and name.startswith("_") and not name.startswith("__")]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def _upward(module: str, imports, mods) -> list[str]:
    src = room(module)
    out = []
    for target, line, _ in imports:
        owner = target if target in mods else target.rsplit(".", 1)[0]
        if owner in mods and room(owner) != src and room(owner) not in ALLOWED[src]:
            out.append(f"{mods[module].relative_to(ROOT)}:{line}: {src} -> {room(owner)} ({target})")
    return out


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    import llmctl.engine.scheduler\n", "layers -> engine"),
    ("from llmctl.serve import protocol\n", "layers -> serve"),
    ("from llmctl.layers import sampler\nfrom llmctl_kernels import reference\n", None),
])
def test_the_check_catches_an_upward_import(source, expected):
    mods = _modules()
    probe = "llmctl.layers.linear"  # any layers module, with this source instead of its own
    found = _upward(probe, _imports(probe, source, False, mods), mods)
    assert {f.split(": ", 1)[1].split(" (")[0] for f in found} == ({expected} if expected else set())


def test_the_repository_root_holds_no_package_but_ours():
    """Run from the repository root (as `make test` is), the root is first on sys.path, so a
    package there shadows an installed one of the same name: a `kernels/` folder once hid the
    PyPI package `kernels`, which transformers imports on every `import transformers`, and no
    transformers import worked. Folders without __init__.py lose to installed packages."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    top |= {p.stem for p in ROOT.glob("*.py")}
    assert top <= {"llmctl", "llmctl_kernels"}, sorted(top)
