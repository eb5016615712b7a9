"""What mypyc is told about a class of the optional compiled build (docs/compiled.md).

`mypyc_attr` is mypy_extensions' decorator when that is installed (it comes with mypy),
and otherwise one that changes nothing: the pure-Python package needs neither. mypy and
mypyc read the import below `TYPE_CHECKING`, so they see the real one either way.

`@mypyc_attr(allow_interpreted_subclasses=True)` lets Python code subclass a compiled
class: the layers a `DaemonNode` builds, which tests replace by a subclass to inject a
fault or note an input (`meshcast.daemon.layers.DaemonLayers`). Calls to its methods
then go through its method table rather than straight to the function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    try:
        from mypy_extensions import mypyc_attr
    except ImportError:  # pure Python: the decorator only tells mypyc something

        def mypyc_attr(*_args: object, **_kwargs: object) -> object:
            return lambda cls: cls


__all__ = ["mypyc_attr"]
