"""Training speed under CPU contention: OpenMP waiting policy and thread count, quiet and with a busy
neighbour.

Why: on a 2-core CPU, torch's two intra-op threads meet at a barrier in every kernel; when another program
takes a core, a spinning waiter burns the time slice its partner needs and a training step slows 5-40×. geoloc
sets ``OMP_WAIT_POLICY=PASSIVE`` at import (``geoloc/__init__.py``); this bench measures that choice against
the OpenMP default (``GEOLOC_OMP_PASSIVE=0``) and one thread, each as a real ``geoloc train`` run (small
preset, a synthetic 20k-row store), with no other load and with one busy-looping process beside it. Runs are
interleaved per repeat; the record names the CPU and whether bf16 is native (fp32 here either way).

    python bench/bench_threads.py            # 3 repeats × 3 settings × 2 loads, 150 steps each (≈ 10 min)
    python bench/bench_threads.py --quick    # 1 repeat, 40 steps
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_speed import machine  # noqa: E402
from tests.helpers import make_store  # noqa: E402

SETTINGS = {
    "openmp default (spinning waiters)": {"GEOLOC_OMP_PASSIVE": "0"},
    "geoloc default (OMP_WAIT_POLICY=PASSIVE)": {},
    "one thread": {"OMP_NUM_THREADS": "1"},
}


def _busy(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _run(store: Path, out: Path, steps: int, env: dict[str, str]) -> float:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    full.update(env)
    cmd = [
        sys.executable,
        "-m",
        "geoloc.cli",
        "train",
        "--preset",
        "small-rfm-s2",
        "--store",
        str(store),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--no-resume",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=full, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    steps, repeats = (40, 1) if args.quick else (args.steps, args.repeats)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        store = Path(tmp) / "store"
        make_store(store, 20_000, 384, splits={"train": 1.0}, label_columns=(), shards=2, failures=0)
        for load in ("quiet", "one busy neighbour"):
            stop = mp.Event()
            hog = mp.Process(target=_busy, args=(stop,)) if load != "quiet" else None
            if hog is not None:
                hog.start()
            try:
                for rep in range(repeats):
                    order = list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))
                    for name in order:
                        wall = _run(store, Path(tmp) / f"run-{rep}-{len(results)}", steps, SETTINGS[name])
                        results.setdefault(load, {}).setdefault(name, []).append(wall)
            finally:
                if hog is not None:
                    stop.set()
                    hog.join()
    info = machine(os.cpu_count() or 1)
    record = {
        "bench": "threads",
        "machine": info,
        "dtype": "fp32",
        "command": f"geoloc train --preset small-rfm-s2 --steps {steps} (start-up included), 20k x 384 store",
        "repeats": repeats,
        "median_wall_s": {
            ld: {k: round(statistics.median(v), 2) for k, v in r.items()} for ld, r in results.items()
        },
        "all_wall_s": {ld: {k: [round(x, 2) for x in v] for k, v in r.items()} for ld, r in results.items()},
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
