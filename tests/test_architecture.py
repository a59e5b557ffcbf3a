"""The package's design, checked from its source: no import circles and arrows that only point down.

Every `import cnncli…` / `from cnncli… import …` of every module counts, at module level, inside functions and
under `if TYPE_CHECKING:` alike (an `ast` walk, nothing imported). `from cnncli.data import cifar10` is an arrow to
the module `cnncli.data.cifar10`, not to the package's `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnncli"

# The layers of the design, lowest first: a module may import only its own part and the parts below it.
PARTS = ["host", "catalogue", "nn", "engine", "config", "data", "run", "bench", "cli", "cnncli"]


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """{'cnncli.nn.model': path, 'cnncli.data': path of data/__init__.py, …} for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(files: dict[str, Path], package: str = "cnncli") -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its source (functions and TYPE_CHECKING included)."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == package:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in files else node.module)  # type: ignore[arg-type]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}: a relative import; the package uses absolute imports only")
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == package)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def part_of(module: str) -> str:
    """'cnncli.nn.model' -> 'nn'; 'cnncli.config' -> 'config'; 'cnncli' (the package's face) -> 'cnncli'."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "cnncli"


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    rank = {p: i for i, p in enumerate(PARTS)}
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if rank[part_of(dst)] > rank[part_of(src)]:
                bad.append(f"{src} -> {dst}")
    return bad


def test_every_module_belongs_to_a_part_of_the_design() -> None:
    strays = [m for m in module_files() if part_of(m) not in PARTS]
    assert not strays, f"modules outside the design's parts {PARTS}: {strays}"


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph(module_files())) == []


def test_imports_only_point_down_the_layers_of_the_design() -> None:
    assert upward_arrows(import_graph(module_files())) == []


def test_the_reference_network_imports_nothing_of_the_engine_data_run_or_cli() -> None:
    graph = import_graph(module_files())
    bad = {m: sorted(t for t in ts if part_of(t) not in ("host", "nn"))
           for m, ts in graph.items() if part_of(m) == "nn"}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_only_the_cli_imports_typer_and_rich() -> None:
    offenders = []
    for name, path in module_files().items():
        if part_of(name) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("typer", "rich")]
    assert offenders == []


@pytest.mark.parametrize(
    ("sources", "expect_cycle"),
    [
        ({"a/__init__.py": "", "a/x.py": "from a.y import f\n", "a/y.py": "def f(): pass\n"}, False),
        # the arrow that closes the circle hides inside a function: still a circle
        ({"a/__init__.py": "", "a/x.py": "from a.y import f\n", "a/y.py": "def f():\n    from a import x\n"}, True),
        # ... or under TYPE_CHECKING
        ({"a/__init__.py": "", "a/x.py": "from a import y\n",
          "a/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.x\n"}, True),
    ],
)
def test_the_walk_sees_circles_closed_inside_functions_and_type_checking(
    tmp_path: Path, sources: dict[str, str], expect_cycle: bool
) -> None:
    """The checker itself, on small packages made for it (module names start with the package 'a')."""
    for rel, text in sources.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(module_files(tmp_path / "a"), package="a")
    assert bool(cycles(graph)) == expect_cycle
