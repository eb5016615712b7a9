"""The layer classifier and summaries of `bench group --profile` (pure functions), from
small synthetic py-spy raw profiles and pstats dumps."""

from __future__ import annotations

import marshal
from pathlib import Path
from typing import Any

import pytest

from meshcast.bench import profile
from meshcast.bench.profile import (
    LAYERS,
    Frame,
    ProfileError,
    classify_stack,
    layer_of_file,
    load_pstats,
    parse_collapsed,
    parse_frame,
    render_text,
    summarise_collapsed,
    summarise_pstats,
)

SRC = "/home/u/meshcast/src/meshcast"
STDLIB = "/usr/lib/python3.11"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


@pytest.mark.parametrize(
    ("file", "layer"),
    [
        (f"{SRC}/group/sessions.py", "session"),
        (f"{SRC}/runtime/sessions.py", "session"),
        (f"{SRC}/group/ordering.py", "ordering"),
        (f"{SRC}/group/engine.py", "ordering"),
        (f"{SRC}/group/flush.py", "ordering"),
        (f"{SRC}/group/membership.py", "ordering"),
        (f"{SRC}/overlay/node.py", "overlay"),
        (f"{SRC}/link/hop.py", "link"),
        (f"{SRC}/wire/client.py", "wire"),
        (f"{SRC}/daemon/node.py", "runtime"),
        (f"{SRC}/runtime/pump.py", "runtime"),
        ("meshcast/wire/group.py", "wire"),  # py-spy's short file names
        ("C:\\py\\meshcast\\link\\secure.py", "link"),
        (f"{STDLIB}/asyncio/base_events.py", "event_loop"),
        (f"{STDLIB}/selectors.py", "event_loop"),
        ("/project/uvloop/loop.c", "event_loop"),
        ("/project/build/libuv-x86_64/src/unix/core.c", "event_loop"),
        (f"{SRC}/errors.py", None),  # a top-level module: its caller decides
        (f"{STDLIB}/dataclasses.py", None),
        (LIBC, None),
        ("", None),
    ],
)
def test_files_map_to_their_layer(file: str, layer: str | None) -> None:
    assert layer_of_file(file) == layer


def test_py_spy_frames_are_parsed_with_and_without_a_line() -> None:
    assert parse_frame("send (/x/meshcast/link/hop.py:224)") == Frame(
        "send", "/x/meshcast/link/hop.py"
    )
    assert parse_frame(f"sendto ({LIBC})") == Frame("sendto", LIBC)
    assert parse_frame(f"0x7f48b8c4524a ({LIBC})") == Frame("0x7f48b8c4524a", LIBC)
    assert parse_frame("__create_fn__.<locals>.__init__ (<string>:6)") == Frame(
        "__create_fn__.<locals>.__init__", "<string>"
    )
    assert parse_frame("weird") == Frame("weird")


def _stack(*frames: tuple[str, str]) -> list[Frame]:
    return [Frame(name, file) for name, file in frames]


LOOP = ("run_forever", f"{STDLIB}/asyncio/base_events.py")
PUMP = ("feed", f"{SRC}/runtime/pump.py")
FORWARD = ("_forward", f"{SRC}/overlay/node.py")
ENCODE = ("encode_data", f"{SRC}/wire/overlay.py")
HOP = ("send", f"{SRC}/link/hop.py")


def test_a_system_call_leaf_wins_over_every_layer() -> None:
    assert classify_stack(_stack(LOOP, PUMP, FORWARD, HOP, ("__libc_sendto", LIBC))) == ("syscalls")
    assert classify_stack(_stack(LOOP, ("epoll_wait", LIBC))) == "syscalls"


def test_a_sample_goes_to_its_innermost_known_layer() -> None:
    assert classify_stack(_stack(LOOP, PUMP, FORWARD, ENCODE)) == "wire"
    assert classify_stack(_stack(LOOP, PUMP, FORWARD)) == "overlay"
    # native code or a library below a layer's frame counts for that layer
    pack = ("s_pack", "/build/Python-3.11.7/Modules/_struct.c")
    assert classify_stack(_stack(LOOP, PUMP, HOP, pack)) == "link"
    dataclass_init = ("__init__", "<string>")
    assert classify_stack(_stack(LOOP, PUMP, FORWARD, dataclass_init)) == "overlay"
    errors = ("__init__", f"{SRC}/errors.py")
    assert classify_stack(_stack(LOOP, PUMP, ENCODE, errors)) == "wire"


def test_a_python_function_named_like_a_system_call_is_not_one() -> None:
    assert classify_stack(_stack(LOOP, PUMP, ("send", f"{SRC}/runtime/endpoints.py"))) == (
        "runtime"
    )
    assert classify_stack(_stack(("select", f"{STDLIB}/selectors.py"))) == "event_loop"


def test_a_sample_of_no_layer_is_other() -> None:
    assert classify_stack([]) == "other"
    assert classify_stack(_stack(("main", "/x/app.py"), ("0x7f", LIBC))) == "other"


RAW = f"""\
0x7f (libc.so.6);run_forever ({STDLIB}/asyncio/base_events.py:607);epoll_wait ({LIBC}) 50
0x7f (libc.so.6);run_forever ({STDLIB}/asyncio/base_events.py:607);feed ({SRC}/runtime/pump.py:130);_forward ({SRC}/overlay/node.py:725);send ({SRC}/link/hop.py:224);sendto ({LIBC}) 20
0x7f (libc.so.6);run_forever ({STDLIB}/asyncio/base_events.py:607);feed ({SRC}/runtime/pump.py:130);_forward ({SRC}/overlay/node.py:725);encode_data ({SRC}/wire/overlay.py:90) 15
0x7f (libc.so.6);run_forever ({STDLIB}/asyncio/base_events.py:607);feed ({SRC}/runtime/pump.py:130);_deliver ({SRC}/group/sessions.py:917) 10
0x7f (libc.so.6);main (/x/app.py:3) 5
this line is no sample
"""


def test_collapsed_stacks_are_parsed_line_by_line() -> None:
    samples = list(parse_collapsed(RAW))
    assert [count for _, count in samples] == [50, 20, 15, 10, 5]
    assert samples[0][0][-1] == Frame("epoll_wait", LIBC)


def test_a_raw_profile_summarises_to_shares_that_sum_to_one() -> None:
    summary = summarise_collapsed(RAW)
    assert summary.total == 100
    shares = summary.shares()
    assert set(shares) == set(LAYERS)
    assert shares["syscalls"] == 0.7
    assert shares["wire"] == 0.15
    assert shares["session"] == 0.1
    assert shares["other"] == 0.05
    assert shares["overlay"] == shares["link"] == shares["ordering"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)
    described = summary.describe()
    assert described["samples"] == 100
    assert described["syscalls"] == {"epoll_wait": 0.5, "sendto": 0.2}
    # without the half spent waiting in epoll_wait: where the CPU went
    assert described["waiting"] == 0.5
    busy = summary.busy_shares()
    assert (busy["syscalls"], busy["wire"], busy["session"], busy["other"]) == (0.4, 0.3, 0.2, 0.1)
    assert sum(busy.values()) == pytest.approx(1.0)
    top = described["top_functions"]
    assert isinstance(top, list)
    assert top[0] == {"layer": "syscalls", "function": "epoll_wait", "file": LIBC, "share": 0.5}


def test_an_empty_profile_has_zero_shares() -> None:
    summary = summarise_collapsed("")
    assert summary.total == 0
    assert set(summary.shares().values()) == {0.0}
    assert set(summary.busy_shares().values()) == {0.0}


# pstats: {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
WIRE_KEY = (f"{SRC}/wire/overlay.py", 90, "encode_data")
OVERLAY_KEY = (f"{SRC}/overlay/node.py", 692, "_forward")
LINK_KEY = (f"{SRC}/link/hop.py", 593, "_pump")
LEN_KEY = ("~", 0, "<built-in method builtins.len>")
SENDTO_KEY = ("~", 0, "<method 'sendto' of '_socket.socket' objects>")
UVLOOP_KEY = ("~", 0, "<method 'sendto' of 'uvloop.loop.UDPTransport' objects>")
HELPER_KEY = (f"{STDLIB}/dataclasses.py", 10, "replace")  # a library function, no layer
CYCLE_A = (f"{STDLIB}/enum.py", 1, "a")
CYCLE_B = (f"{STDLIB}/enum.py", 2, "b")
ORPHAN = ("/x/app.py", 1, "main")
EPOLL_KEY = ("~", 0, "<method 'poll' of 'select.epoll' objects>")
SELECTOR_KEY = (f"{STDLIB}/selectors.py", 451, "select")


def _stats() -> dict[tuple[str, int, str], Any]:
    return {
        WIRE_KEY: (10, 10, 0.2, 0.5, {OVERLAY_KEY: (10, 10, 0.2, 0.5)}),
        OVERLAY_KEY: (10, 10, 0.1, 1.0, {}),
        LINK_KEY: (5, 5, 0.1, 0.3, {}),
        # len: 0.3 s under wire, 0.1 s under overlay: charged 3:1
        LEN_KEY: (
            40,
            40,
            0.4,
            0.4,
            {WIRE_KEY: (30, 30, 0.3, 0.3), OVERLAY_KEY: (10, 10, 0.1, 0.1)},
        ),
        SENDTO_KEY: (5, 5, 0.05, 0.05, {LINK_KEY: (5, 5, 0.05, 0.05)}),
        UVLOOP_KEY: (5, 5, 0.05, 0.05, {LINK_KEY: (5, 5, 0.05, 0.05)}),
        # a library function called from the link, itself calling a builtin
        HELPER_KEY: (2, 2, 0.05, 0.1, {LINK_KEY: (2, 2, 0.05, 0.1)}),
        # two library functions calling each other, reached from the overlay
        CYCLE_A: (1, 1, 0.02, 0.04, {CYCLE_B: (1, 1, 0.01, 0.02), OVERLAY_KEY: (1, 1, 0.01, 0.02)}),
        CYCLE_B: (1, 1, 0.02, 0.04, {CYCLE_A: (1, 1, 0.02, 0.04)}),
        ORPHAN: (1, 1, 0.01, 0.01, {}),  # no layer and no caller: other
        EPOLL_KEY: (2, 2, 0.2, 0.2, {SELECTOR_KEY: (2, 2, 0.2, 0.2)}),  # waiting for work
    }


def test_pstats_own_time_goes_to_layers_and_builtins_to_their_callers(tmp_path: Path) -> None:
    dump = tmp_path / "profile.pstats"
    dump.write_bytes(marshal.dumps(_stats()))
    summary = summarise_pstats(load_pstats(dump))
    total = 0.2 + 0.1 + 0.1 + 0.4 + 0.05 + 0.05 + 0.05 + 0.02 + 0.02 + 0.01 + 0.2
    assert summary.total == pytest.approx(total)
    weights = summary.weights
    assert weights["wire"] == pytest.approx(0.2 + 0.3)
    assert weights["overlay"] == pytest.approx(0.1 + 0.1 + 0.04)  # + len + the cycle
    assert weights["link"] == pytest.approx(0.1 + 0.05)  # + the library helper
    assert weights["syscalls"] == pytest.approx(0.05 + 0.2)
    assert summary.waiting == pytest.approx(0.2)
    assert summary.busy_shares()["syscalls"] == pytest.approx(0.05 / (total - 0.2), abs=1e-4)
    assert weights["event_loop"] == pytest.approx(0.05)  # uvloop's methods
    assert weights["other"] == pytest.approx(0.01)
    assert sum(summary.shares().values()) == pytest.approx(1.0, abs=1e-3)
    described = summary.describe()
    assert described["profiler"] == "cProfile"
    assert described["seconds"] == pytest.approx(total)
    assert described["syscalls"] == {
        EPOLL_KEY[2]: pytest.approx(0.2 / total, abs=1e-4),
        SENDTO_KEY[2]: pytest.approx(0.05 / total, abs=1e-4),
    }


def test_a_file_that_is_no_pstats_dump_is_refused(tmp_path: Path) -> None:
    dump = tmp_path / "bad.pstats"
    dump.write_bytes(marshal.dumps([1, 2, 3]))
    with pytest.raises(ProfileError):
        load_pstats(dump)


def test_the_text_table_has_a_row_per_layer_and_a_column_per_daemon() -> None:
    text = render_text(
        "3d-1000B-AGREED", {"daemon1": {"wire": 0.25, "syscalls": 0.75}, "daemon2": {}}
    )
    lines = text.splitlines()
    assert lines[0] == "3d-1000B-AGREED"
    assert lines[1].split() == ["layer", "daemon1", "daemon2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == list(LAYERS)
    assert rows["wire"] == ["25.0", "%", "0.0", "%"]
    assert rows["syscalls"] == ["75.0", "%", "0.0", "%"]


def test_the_profiler_is_chosen_by_what_is_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert profile.choose("cprofile") == "cProfile"
    monkeypatch.setenv("PATH", str(tmp_path))  # no py-spy here
    assert profile.choose("auto") == "cProfile"
    with pytest.raises(ProfileError, match="py-spy"):
        profile.choose("py-spy")
    spy = tmp_path / "py-spy"
    spy.write_text("#!/bin/sh\n")
    spy.chmod(0o755)
    assert profile.choose("auto") == "py-spy"
