"""`json_ready`: the one cleaner for the STATUS report and the daemon's JSON log lines."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

from meshcast.wire.client import json_ready


def test_non_finite_floats_become_null_and_containers_plain_json() -> None:
    value = {
        1: (math.inf, -math.inf, 2.5),
        "nested": MappingProxyType({"rate": math.inf, "list": [math.nan, 3]}),
    }
    ready = json_ready(value)
    assert ready == {"1": [None, None, 2.5], "nested": {"rate": None, "list": [None, 3]}}
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready


def test_other_values_are_left_alone() -> None:
    assert json_ready("text") == "text"
    assert json_ready(7) == 7
    assert json_ready(None) is None
    assert json_ready(True) is True
