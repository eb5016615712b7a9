"""`meshcast replicate`'s pieces: the rate option, the progress views, the report texts."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from meshcast.argtypes import bit_rate
from meshcast.client.replicate_cli import (
    LineView,
    RichView,
    finish,
    human_bytes,
    human_eta,
    human_rate,
    missing_lines,
    render_report,
    summary_line,
)
from meshcast.client.replication import ReplicationReport, parse_report, targets_text
from meshcast.errors import UsageError


def make(
    state: str, recipients: dict[str, tuple[str, int]], final: bool = False
) -> ReplicationReport:
    entries = [
        {
            "daemon": name,
            "state": where,
            "held_bytes": held,
            "bad_chunks": 1 if where == "failed" else 0,
            "rate": 125_000.0,
            "eta": None if where in ("complete", "failed") else 4.0,
            "detail": "hash mismatch at chunk 3" if where == "failed" else "",
            "path": f"/d/{name}/big.iso" if where == "complete" else None,
        }
        for name, (where, held) in recipients.items()
    ]
    text = json.dumps(
        {
            "rid": "00000000000000ff",
            "name": "big.iso",
            "size": 2 << 20,
            "digest": "cd" * 32,
            "state": state,
            "elapsed": 3.25,
            "detail": "",
            "recipients": entries,
        }
    )
    return parse_report(text, final)


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("80M", 80e6),
        ("80Mbit", 80e6),
        ("1.5G", 1.5e9),
        ("500k", 5e5),
        ("1000", 1e3),
        ("2 Gbit", 2e9),
    ],
)
def test_rates_are_bits_per_second(text: str, bits: float) -> None:
    assert bit_rate(text) == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10MB/s", "ambiguous rate"),
        ("100Mbps", "ambiguous rate"),
        ("12MB", "ambiguous rate"),
        ("fast", "not a rate"),
        ("", "not a rate"),
        ("0", "must be a positive rate"),
        ("nan", "must be a positive rate"),
        ("-5M", "must be a positive rate"),
    ],
)
def test_bad_rates_are_refused(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        bit_rate(text)


def test_human_units() -> None:
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(999) == "999 B"
    assert human_rate(12.5e6) == "100.0 Mbit/s"
    assert human_eta(None) == "-"
    assert human_eta(75) == "1 min 15 s"
    assert human_eta(7260) == "2 h 01 min"


def test_targets_from_lists_and_strings() -> None:
    assert targets_text(["D2", "D3"]) == "D2,D3"
    assert targets_text("group:ops") == "group:ops"
    with pytest.raises(UsageError, match="no ',' in it"):
        targets_text(["D2,D3"])
    with pytest.raises(UsageError, match="twice"):
        targets_text("D2,D2")


def test_summary_line_sums_the_recipients() -> None:
    report = make("running", {"D2": ("receiving", 1 << 20), "D3": ("complete", 2 << 20)})
    assert summary_line(report) == (
        "big.iso: running, 3.0 MiB of 4.0 MiB (75%) held by 2 daemons "
        "(1 receiving, 1 complete); 2.0 Mbit/s; ETA 4 s"
    )


def test_the_line_view_prints_at_most_one_line_per_interval_and_the_last() -> None:
    out = io.StringIO()
    view = LineView(out, interval=3600.0)
    for held in (1, 2, 3):
        view.update(make("running", {"D2": ("receiving", held)}))
    view.update(make("complete", {"D2": ("complete", 2 << 20)}, final=True))
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "running, 1 B" in lines[0]
    assert "complete" in lines[1]

    pending = io.StringIO()
    view = LineView(pending, interval=3600.0)
    view.update(make("running", {"D2": ("receiving", 1)}))
    view.update(make("running", {"D2": ("receiving", 9)}))
    view.close()  # the session ended: the newest progress is still shown
    assert "running, 9 B" in pending.getvalue().splitlines()[-1]


def test_the_rich_table_shows_every_recipient() -> None:
    console = Console(record=True, width=110, file=io.StringIO())
    report = make(
        "running",
        {"D2": ("receiving", 1 << 20), "D3": ("complete", 2 << 20), "D4": ("failed", 0)},
    )
    console.print(render_report(report))
    text = console.export_text()
    assert "recipient" in text
    assert "ETA" in text
    assert "1.0 MiB / 2.0 MiB" in text
    assert "complete" in text
    assert "failed" in text
    assert "50%" in text
    live = io.StringIO()
    view = RichView(live)  # not a terminal: rich draws the last frame on stop
    view.update(report)
    view.close()
    assert "D4" in live.getvalue()


def test_finish_names_who_misses_what() -> None:
    report = make("failed", {"D2": ("complete", 2 << 20), "D3": ("failed", 1 << 20)}, final=True)
    assert missing_lines(report) == [
        "D3 is missing 1.0 MiB of 2.0 MiB (failed: hash mismatch at chunk 3)"
    ]
    out, err = io.StringIO(), io.StringIO()
    assert finish(report, False, out, err) == 1
    assert out.getvalue().splitlines()[1:] == [
        "  D2  complete   /d/D2/big.iso",
        "  D3  failed     hash mismatch at chunk 3",
    ]
    assert "D3 is missing" in err.getvalue()
    out = io.StringIO()
    done = make("complete", {"D2": ("complete", 2 << 20)}, final=True)
    assert finish(done, True, out, io.StringIO()) == 0
    assert json.loads(out.getvalue()) == done.to_json()


def test_the_status_text_lists_replications_and_who_is_not_done() -> None:
    from meshcast.client.status import format_status

    running = make("running", {"D2": ("receiving", 1 << 20), "D3": ("complete", 2 << 20)})
    text = format_status({"replication": {"replications": [running.to_json()]}})
    assert "replications: 1" in text
    assert "00000000000000ff  big.iso  running  3145728 of 4194304 bytes (75%)" in text
    assert "1 of 2 recipients complete" in text
    assert "    D2  receiving  1048576 bytes" in text
    assert "D3  complete" not in text  # the complete ones are not listed one by one
    assert "replications" not in format_status({"replication": {"replications": []}})


def test_local_pieces_hash_streamed_and_compare(tmp_path: Path) -> None:
    import blake3

    from meshcast.demo.replicate import Copy, file_digest, local_config, print_digests

    data = bytes(range(256)) * 9000  # > 2 read chunks
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    digest = blake3.blake3(data).hexdigest()
    assert file_digest(source) == digest
    out = io.StringIO()
    good = [Copy("D2", "/c/D2", digest), Copy("D3", "/c/D3", digest)]
    assert print_digests(str(source), digest, good, out)
    assert out.getvalue().splitlines()[-1] == "all 2 copies equal the source"
    out = io.StringIO()
    bad = [
        Copy("D2", "/c/D2", digest),
        Copy("D3", "/c/D3", "00" * 32),
        Copy("D4", None, None, "failed"),
    ]
    assert not print_digests(str(source), digest, bad, out)
    lines = out.getvalue().splitlines()
    assert lines[-3].endswith("/c/D3  DIFFERS")
    assert "(no copy)" in lines[-2]
    assert lines[-1] == "NOT every copy equals the source"
    assert not print_digests(str(source), digest, [], io.StringIO())
    config = local_config(3, "local-1")
    assert [(d.name, d.host, d.node_id) for d in config.daemons] == [
        ("D1", "127.0.0.1", 1),
        ("D2", "127.0.0.2", 2),
        ("D3", "127.0.0.3", 3),
    ]


def test_stalled_transfers_and_recipients_are_named() -> None:
    from meshcast.client.status import format_status

    running = make("running", {"D2": ("receiving", 1 << 20), "D3": ("receiving", 0)})
    entry = running.to_json()
    entry["recipients"][1]["stalled"] = 12.5  # type: ignore[index]
    transfer = {
        "rid": "00000000000000ff",
        "name": "big.iso",
        "role": "origin",
        "stalled": {
            "for": 12.5,
            "waiting_on": [3],
            "why": "1 receivers take no data",
            "waiting_on_daemons": ["D3"],
        },
    }
    quiet = {**transfer, "rid": "00000000000000fe", "stalled": None}
    text = format_status({"replication": {"replications": [entry], "transfers": [transfer, quiet]}})
    assert (
        "STALLED: replication 00000000000000ff of big.iso (origin): no progress for 12.5 s, "
        "waiting on D3 (1 receivers take no data)"
    ) in text
    assert "00000000000000fe" not in text
    assert "    D3  receiving  0 bytes  (stalled: no report for 12.5 s)" in text
    report = parse_report(json.dumps(entry), False)
    assert [r.stalled for r in report.recipients] == [None, 12.5]
    assert summary_line(report).endswith("; stalled: D3 (12 s)")
    console = Console(record=True, width=110, file=io.StringIO())
    console.print(render_report(report))
    assert "receiving (stalled 12 s)" in console.export_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replicate", "--id", "00000000000000ff"], "give --rate R"),
        (["replicate", "f", "--id", "00000000000000ff", "--rate", "8M"], "no FILE"),
        (["replicate"], "give the FILE to replicate"),
    ],
)
def test_replicate_id_needs_a_rate_and_no_file(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshcast.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_rate_none_is_no_cap() -> None:
    from meshcast.client.replicate_cli import bit_rate_or_none

    assert bit_rate_or_none("none") == bit_rate_or_none(" None ") == 0.0
    assert bit_rate_or_none("8M") == 8e6
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive rate"):
        bit_rate_or_none("0")
