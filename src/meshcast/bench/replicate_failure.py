"""`meshcast bench replicate`, part `failure_sim`: random multi-failure runs in the simulator.

Each seed draws an instance: N recipients (8-64, log-uniform: as many runs with 8-16 as
with 32-64) and a file of 8, 12 or 16 chunks of 16 KiB (the last one half full), every node uploading 1 Mbit/s (a chunk takes 0.13 s to send, so the
simulator's failure detection, `ReplicationSim.detect`, is a few chunk times, as a 3 s
failure timeout is against a 128 MiB file at 100 Mbit/s), the origin (node 0) with a
buddy (the last node) that holds the same file. It runs with 1-3 nodes crashed
(`ReplicationSim.crash`) at moments drawn uniformly over the failure-free run of the same
instance (each instance's failure-free run is simulated once), the victims drawn from the
recipients and the buddy (in a quarter of the seeds the buddy is always one of them).

A survivor is a recipient that was not crashed. It is identical when its store holds every
chunk of the file and each reads back with the manifest's BLAKE3 chunk hash. The slowdown
of a seed is the survivors' last completion with the failures over the same survivors'
last completion without. `all_survivors_identical` is over every run; `mean_slowdown`
and the quantiles over the runs where every survivor completed.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshcast.errors import IntegrityError
from meshcast.ids import NodeId
from meshcast.replicate.engine import ReplicationRequest
from meshcast.replicate.manifest import chunk_digest
from meshcast.sim.replication import ReplicationSim, SimOutcome

log = logging.getLogger(__name__)

KIB = 1 << 10
UPLOAD = 1e6  # bits/s of every node
LATENCY = 0.0005  # s, one way
CHUNK = 16 * KIB
RECIPIENTS = (8, 64)  # N drawn log-uniformly from this range (inclusive)
# Chunks of the file: the simulation's cost grows with N x chunks, and a few sizes let
# each instance's failure-free run be simulated once for many seeds.
CHUNKS = (8, 12, 16)
ENGINE_SEED = 1  # the engines' randomness: the same in an instance's runs with and without
FAILURES = (1, 3)  # crashed nodes per run
BUDDY_SHARE = 0.25  # of the seeds whose victims always include the buddy
RUNS, QUICK_RUNS = 1000, 40
TIME_LIMIT = 1000.0  # x the failure-free run: a run still going then counts as stalled


@dataclass(frozen=True, slots=True)
class FailureSimRun:
    seed: int
    recipients: int
    chunks: int
    victims: tuple[int, ...]  # node indices crashed (the buddy is recipients + 1)
    moments: tuple[float, ...]  # s after the request, one per victim
    buddy_failed: bool
    baseline: float  # s: the survivors' last completion without failures
    last: float  # s: with the failures (inf: some survivor never completed)
    identical: bool  # every survivor holds every chunk, each with its hash
    state: str  # the final report's state in the run with failures

    @property
    def slowdown(self) -> float:
        return self.last / self.baseline


def _simulate(
    recipients: int, chunks: int, crashes: Sequence[tuple[int, float]], limit: float
) -> tuple[ReplicationSim, SimOutcome]:
    uploads = [UPLOAD] * (recipients + 2)  # origin, recipients, buddy
    sim = ReplicationSim(uploads, latency=LATENCY, seed=ENGINE_SEED)
    sim.add_file("failure.bin", chunks * CHUNK - CHUNK // 2, CHUNK, seed=chunks)
    for node, at in crashes:
        sim.crash(node, at=at)
    request = ReplicationRequest(
        "failure.bin", tuple(sim.ids[1 : recipients + 1]), buddy=sim.ids[recipients + 1]
    )
    return sim, sim.run_replication(request, until=limit)


def _identical(sim: ReplicationSim, node: int) -> bool:
    ((digest, f),) = sim.files.items()
    store = sim.stores[node]
    try:
        return all(
            chunk_digest(store.read(digest, i)) == f.manifest.chunk_hashes[i]
            for i in range(f.manifest.chunk_count)
        )
    except IntegrityError:
        return False


def _last(outcome: SimOutcome, nodes: Sequence[NodeId]) -> float:
    times = [outcome.completed.get(node) for node in nodes]
    if any(t is None for t in times):
        return float("inf")
    return max(t for t in times if t is not None) - outcome.started


class _Baselines:
    """Each instance's failure-free run, simulated once."""

    def __init__(self) -> None:
        self._runs: dict[tuple[int, int], SimOutcome] = {}

    def get(self, recipients: int, chunks: int) -> SimOutcome:
        key = (recipients, chunks)
        if key not in self._runs:
            _, outcome = _simulate(recipients, chunks, (), 1e9)
            if len(outcome.completed) != recipients:
                raise RuntimeError(f"N={recipients}, {chunks} chunks: no failure, no completion")
            self._runs[key] = outcome
        return self._runs[key]

    def __len__(self) -> int:
        return len(self._runs)


def failure_run(seed: int, baselines: _Baselines | None = None) -> FailureSimRun:
    """One seed: an instance and 1-3 crashes, against the instance without failures."""
    rng = random.Random(seed)
    low, high = RECIPIENTS
    recipients = min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))
    chunks = rng.choice(CHUNKS)
    buddy = recipients + 1
    count = rng.randint(*FAILURES)
    if rng.random() < BUDDY_SHARE:
        victims = [buddy, *rng.sample(range(1, recipients + 1), count - 1)]
    else:
        victims = rng.sample(range(1, buddy + 1), count)
    plain = (baselines if baselines is not None else _Baselines()).get(recipients, chunks)
    survivor_nodes = [i for i in range(1, recipients + 1) if i not in victims]
    survivors = [NodeId(i + 1) for i in survivor_nodes]  # ReplicationSim.ids
    baseline = _last(plain, survivors)
    moments = [rng.uniform(0.0, baseline) for _ in victims]
    sim, failed = _simulate(
        recipients, chunks, list(zip(victims, moments, strict=True)), baseline * TIME_LIMIT
    )
    return FailureSimRun(
        seed=seed,
        recipients=recipients,
        chunks=chunks,
        victims=tuple(victims),
        moments=tuple(moments),
        buddy_failed=buddy in victims,
        baseline=baseline,
        last=_last(failed, survivors),
        identical=all(_identical(sim, i) for i in survivor_nodes),
        state=failed.report.state if failed.report is not None else "no report",
    )


def measure_failure_sim(quick: bool, seed: int) -> dict[str, Any]:
    """`failure_sim`: RUNS seeds (QUICK_RUNS with --quick) from `seed` * 1,000,000 on."""
    count = QUICK_RUNS if quick else RUNS
    started, wall = time.process_time(), time.monotonic()
    baselines = _Baselines()
    runs = [failure_run(seed * 1_000_000 + i, baselines) for i in range(count)]
    cpu = time.process_time() - started
    finished = [r for r in runs if r.last != float("inf")]
    slowdowns = sorted(r.slowdown for r in finished)
    broken = [r for r in runs if not r.identical or r.last == float("inf")]
    for r in broken[:10]:
        log.warning("failure_sim seed %d: survivors not all identical (%s)", r.seed, r)

    def quantile(q: float) -> float | None:
        if not slowdowns:
            return None
        return round(slowdowns[min(len(slowdowns) - 1, int(q * len(slowdowns)))], 4)

    return {
        "runs": count,
        "all_survivors_identical": not broken,
        "mean_slowdown": round(statistics.fmean(slowdowns), 4) if slowdowns else None,
        "median_slowdown": quantile(0.5),
        "p95_slowdown": quantile(0.95),
        "max_slowdown": quantile(1.0),
        "runs_identical": sum(r.identical for r in runs),
        "runs_completed": len(finished),
        "runs_buddy_failed": sum(r.buddy_failed for r in runs),
        "failures_per_run": {
            str(k): sum(len(r.victims) == k for r in runs)
            for k in range(FAILURES[0], FAILURES[1] + 1)
        },
        "failed_seeds": [r.seed for r in broken][:20],
        "params": {
            "recipients": list(RECIPIENTS),
            "recipients_drawn": "log-uniform",
            "chunks": list(CHUNKS),
            "last_chunk": "half full",
            "failure_free_runs": len(baselines),
            "detect_s": ReplicationSim([UPLOAD]).detect,
            "chunk_kib": CHUNK // KIB,
            "upload_mbit": UPLOAD / 1e6,
            "latency_ms": LATENCY * 1e3,
            "strategy": "fastreplica (default plan)",
            "buddy": "the last node, holding the same file",
            "failures": list(FAILURES),
            "buddy_always_fails_share": BUDDY_SHARE,
            "moments": "uniform over the survivors' failure-free completion time",
            "first_seed": seed * 1_000_000,
            "quick": quick,
            "cpu_s": round(cpu, 1),
            "wall_s": round(time.monotonic() - wall, 1),
        },
    }


__all__ = ["FailureSimRun", "failure_run", "measure_failure_sim"]
