"""Protocol packages stay sans-I/O and dependencies point down only (STYLE.md §1).

Every package and top-level module of `meshcast` is a *unit* with a row in `ALLOWED`: the
units it may import. The table is the layering of docs/design/layering.md; keep the two
the same. Imports are read from the AST of every module, at any depth (function-level and
`TYPE_CHECKING` imports count: they are dependencies too), plus module paths written as
string constants in a module that calls `importlib.import_module` (the `bench` suites, the
lazy names of `meshcast/__init__.py`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection, Iterator, Mapping
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "meshcast"
ROOT = "meshcast"  # the unit of src/meshcast/__init__.py: the public API

BASE = {"errors", "ids", "compile_hints"}
WIRE = BASE | {"wire"}
LINK = WIRE | {"link"}
OVERLAY = LINK | {"overlay"}
GROUP = OVERLAY | {"group"}
PROTOCOL = GROUP | {"replicate", "daemon"}

# unit -> the units it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    # leaves, usable from anywhere
    "errors": set(),  # the one exception hierarchy
    "ids": {"errors"},  # NodeId, GroupName, ...
    "compile_hints": set(),  # what mypyc is told about a class (the optional compiled build)
    "socket_paths": set(),  # where a daemon's client socket is: shared by runtime and client
    "argtypes": {"errors"},  # CLI value types, parser, handler runner: shared by every CLI
    # the sans-I/O protocol stack, each layer above the previous one
    "wire": BASE,  # codecs
    "link": WIRE,  # Hop link
    "overlay": LINK,  # daemon membership, routing, forwarding
    "group": OVERLAY,  # groups, ordering, sessions
    "replicate": OVERLAY,  # bulk replication (a sibling of group)
    "daemon": GROUP | {"replicate", "config"},  # the sans-I/O daemon over them all
    # the cluster file: builds each layer's config, so it sits above the layers
    "config": GROUP | {"replicate"},
    # drivers: they drive the layers and no layer imports them
    "sim": PROTOCOL | {"config"},
    "runtime": PROTOCOL | {"config", "argtypes", "socket_paths"},
    "client": WIRE | {"config", "argtypes", "socket_paths"},  # the client library and CLIs
    # applications at the top
    "demo": PROTOCOL | {"config", "argtypes", "runtime", "client"},
    "bench": PROTOCOL | {"config", "argtypes", "sim", "runtime", "client"},
    "cli": PROTOCOL
    | {"config", "argtypes", "socket_paths", "sim", "runtime", "client", "demo", "bench"},
    ROOT: WIRE | {"client"},  # `import meshcast`: connect, Message, service levels, errors
    "__main__": {"cli"},
}
PLANNED: set[str] = set()  # rows for packages the issues still have to build
# sans-I/O: no I/O, no clock, no global randomness; the simulator too (with the TCP model
# it hosts): one seed must reproduce one run
SANS_IO_PACKAGES = ("wire", "link", "overlay", "group", "replicate", "daemon", "sim")
FORBIDDEN_MODULES = {"asyncio", "socket", "time", "threading", "subprocess", "selectors"}
_MODULE_STRING = re.compile(r"meshcast(\.[a-z_][a-z0-9_]*)+")


def unit_of_path(path: Path) -> str:
    relative = path.relative_to(SRC)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return ROOT if relative.stem == "__init__" else relative.stem


def units_on_disk() -> set[str]:
    return {unit_of_path(path) for path in SRC.rglob("*.py")}


def python_files(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


def module_name(path: Path) -> str:
    """`meshcast.wire.client` for src/meshcast/wire/client.py (a directory: its package)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Every module `path` imports, absolute, with its line: `from . import x` and
    `from meshcast import x` both name `meshcast.x` (a submodule or an attribute)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    # module paths as strings count only where importlib imports by name (not logger
    # names, not `python -m meshcast.cli` for a child process)
    imports_by_name = any(
        isinstance(node, ast.Attribute) and node.attr == "import_module" for node in ast.walk(tree)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module != ROOT:  # `from meshcast import wire` imports wire, not the API
                yield module, node.lineno
            for alias in node.names:
                yield f"{module}.{alias.name}", node.lineno
        elif (
            imports_by_name
            and isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.fullmatch(node.value)
        ):
            yield node.value, node.lineno


def unit_of_module(module: str, known: set[str]) -> str | None:
    """The unit `module` belongs to, None for anything outside meshcast."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return None
    if len(parts) > 1 and parts[1] in known:
        return parts[1]
    return ROOT  # `import meshcast` or `from meshcast import connect`


@cache
def unit_graph() -> Mapping[str, Mapping[str, tuple[str, ...]]]:
    """unit -> imported unit -> where (path:line), for every import between two units."""
    known = units_on_disk()
    graph: dict[str, dict[str, list[str]]] = {unit: {} for unit in known}
    for path in sorted(SRC.rglob("*.py")):
        source = unit_of_path(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module, line in imported_names(path, tree):
            target = unit_of_module(module, known)
            if target is not None and target != source:
                where = f"{path.relative_to(SRC.parent)}:{line}"
                graph[source].setdefault(target, []).append(where)
    return {u: {t: tuple(w) for t, w in edges.items()} for u, edges in graph.items()}


def find_cycle(graph: Mapping[str, Collection[str]]) -> list[str]:
    """One cycle of `graph` as a path [a, b, ..., a], or [] when it is acyclic."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_every_unit_has_a_row_and_every_row_a_unit() -> None:
    on_disk = units_on_disk()
    assert on_disk - ALLOWED.keys() == set(), "add these to ALLOWED and docs/design/layering.md"
    assert ALLOWED.keys() - PLANNED - on_disk == set(), "stale rows in ALLOWED"
    named = set().union(*ALLOWED.values())
    assert named <= ALLOWED.keys(), f"unknown units in ALLOWED: {named - ALLOWED.keys()}"


def test_the_design_doc_has_a_row_for_every_unit() -> None:
    doc = (SRC.parent.parent / "docs" / "design" / "layering.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z_]+)`", doc, flags=re.MULTILINE))
    assert rows == set(ALLOWED)


def test_the_allowed_table_is_a_layering() -> None:
    assert find_cycle(ALLOWED) == []


@pytest.mark.parametrize("unit", sorted(units_on_disk()))
def test_imports_follow_the_table(unit: str) -> None:
    wrong = {
        target: where for target, where in unit_graph()[unit].items() if target not in ALLOWED[unit]
    }
    assert wrong == {}, f"{unit} may import only {sorted(ALLOWED[unit])}"


def test_no_import_cycles_between_units() -> None:
    assert find_cycle(unit_graph()) == []


def test_the_graph_sees_function_level_and_string_imports() -> None:
    # the reader itself: these edges exist only inside functions or as importlib strings
    graph = unit_graph()
    assert "demo" in graph["cli"]  # `from meshcast.demo.cluster import ...` in a function
    assert "bench" in graph["cli"]  # BENCH_SUITES: module paths for importlib


def test_relative_imports_are_resolved() -> None:
    source = "from .client import A\nfrom .. import ids\nimport meshcast.link.hop\n"
    names = {m for m, _ in imported_names(SRC / "wire" / "x.py", ast.parse(source))}
    assert names == {
        "meshcast.wire.client",
        "meshcast.wire.client.A",
        "meshcast.ids",
        "meshcast.link.hop",
    }
    in_init = {m for m, _ in imported_names(SRC / "wire" / "__init__.py", ast.parse(source))}
    assert "meshcast.wire.client" in in_init


def test_cycles_are_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_wire_client_protocol_stands_alone() -> None:
    # `wire.group` takes ServiceLevel from `wire.client` (one numbering on both wires);
    # the client protocol module itself imports nothing else of wire, so the client
    # library gets the client codec without the daemon-to-daemon formats
    path = SRC / "wire" / "client.py"
    names = {m for m, _ in imported_names(path, ast.parse(path.read_text(encoding="utf-8")))}
    assert {m for m in names if m.startswith("meshcast.wire")} == set()


@pytest.mark.parametrize("package", [p for p in SANS_IO_PACKAGES if (SRC / p).is_dir()])
def test_protocol_code_does_no_io_and_reads_no_clock(package: str) -> None:
    for path in python_files(package):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {name.split(".")[0] for name, _ in imported_names(path, tree)}
        assert not roots & FORBIDDEN_MODULES, f"{path} imports {roots & FORBIDDEN_MODULES}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "random":
                    assert node.attr == "Random", f"{path}:{node.lineno} uses random.{node.attr}"
                if node.value.id == "os":
                    assert node.attr != "urandom", f"{path}:{node.lineno} uses os.urandom"
