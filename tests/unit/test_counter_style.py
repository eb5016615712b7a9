"""One counter style across src/meshcast (STYLE.md §3 and §8, issue 11 item 5).

A layer counts in private int fields bumped with ``+= 1`` (one `@dataclass(slots=True)`
``_Counters`` per layer, so mypy checks every name) and reports them through
``statistics()``, a frozen dataclass. Read from the AST of every module: no string-keyed
``bump(**kw)``, no public mutable ``stats`` object, no counters kept in a dict, every
``_Counters`` field reported, every ``statistics()`` frozen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "meshcast"


# attributes naming a counters object or dict: `self._stats[...] += 1` counts under a
# string key (a local tally, as a bench keeps, is no layer's counter)
_COUNTER_HOLDERS = {"stats", "_stats", "counts", "_counts", "counters", "_counters"}


def _targets(node: ast.AST) -> Iterator[ast.expr]:
    """What an assignment writes to (tuples unpacked)."""
    if isinstance(node, ast.Assign):
        pending = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        pending = [node.target]
    else:
        return
    while pending:
        target = pending.pop()
        if isinstance(target, ast.Tuple | ast.List):
            pending.extend(target.elts)
        else:
            yield target


def _holder_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def old_style(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each counter written in one of the old styles."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"bump", "_bump"}
            and node.keywords
        ):
            found.append((node.lineno, f"{node.func.attr}(**kw): counters by string key"))
        for target in _targets(node):
            if isinstance(target, ast.Attribute):
                if _holder_name(target.value) == "stats":
                    found.append((target.lineno, f"stats.{target.attr} written: a public stats"))
                elif target.attr == "stats":
                    found.append((target.lineno, "a public mutable `stats` attribute"))
            if (
                isinstance(node, ast.AugAssign)
                and isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Attribute)
                and target.value.attr in _COUNTER_HOLDERS
            ):
                found.append((target.lineno, "a counter kept in a dict (subscripted +=)"))
    return found


def _field_names(cls: ast.ClassDef) -> list[str]:
    return [
        s.target.id
        for s in cls.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    ]


def unreported_counters(tree: ast.AST) -> list[str]:
    """Fields of the module's `_Counters` that no snapshot is built from: each must be
    passed by keyword (checked by mypy), unless the module takes them all from
    `fields(_Counters)`."""
    counters = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_Counters"]
    if not counters:
        return []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and _holder_name(node.func) == "fields"
            and any(isinstance(a, ast.Name) and a.id == "_Counters" for a in node.args)
        ):
            return []
    keywords = {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords}
    return [name for cls in counters for name in _field_names(cls) if name not in keywords]


def _is_frozen_dataclass(cls: ast.ClassDef) -> bool:
    for deco in cls.decorator_list:
        if isinstance(deco, ast.Call) and _holder_name(deco.func) == "dataclass":
            return any(
                k.arg == "frozen" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in deco.keywords
            )
    return False


def snapshot_types(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, class name) of what each `statistics()` (or `*_statistics()`) returns."""
    return [
        (node.lineno, node.returns.id)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name.endswith("statistics")
        and isinstance(node.returns, ast.Name)
    ]


def python_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


@cache
def classes() -> dict[str, list[ast.ClassDef]]:
    """Every class of src/meshcast by name (a name may be defined more than once)."""
    found: dict[str, list[ast.ClassDef]] = {}
    for path in python_files():
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(node)
    return found


# ---------------------------------------------------------------- the rules, over src


def test_counters_are_typed_fields_not_string_keys() -> None:
    found = [
        f"{rel(path)}:{line}: {what}"
        for path in python_files()
        for line, what in old_style(parsed(path))
    ]
    assert found == []


def test_every_counter_is_reported() -> None:
    found = {rel(p): names for p in python_files() if (names := unreported_counters(parsed(p)))}
    assert found == {}


def test_every_statistics_returns_a_frozen_dataclass() -> None:
    seen = 0
    for path in python_files():
        for line, name in snapshot_types(parsed(path)):
            defined = classes().get(name, [])
            assert defined, f"{rel(path)}:{line}: {name} is not a class of meshcast"
            assert all(_is_frozen_dataclass(c) for c in defined), f"{rel(path)}:{line}: {name}"
            seen += 1
    assert seen >= 10  # the scan sees the layers' statistics()


# ---------------------------------------------------------------- the checks catch each style


@pytest.mark.parametrize(
    "source",
    [
        "self._stats.bump(sent=1)",
        "self._bump(internal_errors=1)",
        "self.stats.sent += 1",
        "node.stats.sent = 0",
        "self.stats = OverlayStats()",
        'self._stats["sent"] += 1',
        'self._counts["sent"] += len(data)',
        "a, self.stats.x = 1, 2",  # in a tuple
        "self.stats.y: int = 0",
    ],
)
def test_each_old_style_is_found(source: str) -> None:
    assert old_style(ast.parse(source)) != []


@pytest.mark.parametrize(
    "source",
    [
        "self._counters.sent += 1",
        "c = self._counters\nc.sent += len(data)",
        "self.fanout[parent] += 1",  # a dict of state, not of counters
        "counts[node] += 1",  # a local tally
        "stats = self.statistics()\nprint(stats.sent)",
        "self._stats.bump(1)",  # positional: not the string-keyed style
    ],
)
def test_the_new_style_passes(source: str) -> None:
    assert old_style(ast.parse(source)) == []


def test_a_counter_left_out_of_the_snapshot_is_found() -> None:
    module = """
@dataclass(slots=True)
class _Counters:
    sent: int = 0
    lost: int = 0

def statistics(self) -> Stats:
    return Stats(sent=self._counters.sent)
"""
    assert unreported_counters(ast.parse(module)) == ["lost"]
    everything = module + "\nNAMES = [f.name for f in fields(_Counters)]\n"
    assert unreported_counters(ast.parse(everything)) == []


def test_a_mutable_snapshot_is_found() -> None:
    frozen, mutable = ast.parse(
        "@dataclass(frozen=True, slots=True)\nclass A: ...\n@dataclass(slots=True)\nclass B: ..."
    ).body
    assert isinstance(frozen, ast.ClassDef)
    assert isinstance(mutable, ast.ClassDef)
    assert _is_frozen_dataclass(frozen)
    assert not _is_frozen_dataclass(mutable)
