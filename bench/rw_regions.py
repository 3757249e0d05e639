"""How long the random walker takes on one large seeded foreground region, against RW_MAX_WORK.

    OMP_NUM_THREADS=1 python3 bench/rw_regions.py
    OMP_NUM_THREADS=1 python3 bench/rw_regions.py --no-cap   # the walker everywhere (skips 512/300)

Each case is one square region of random semantic probabilities, all foreground, with k random
seeds; `postprocess.random_walker_per_region` solves it with the walker when seeds x pixels is at
most RW_MAX_WORK and splits it with the watershed above. The printed seconds are one run each.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import postprocess as pp  # noqa: E402

CASES = [(223, 8), (126, 25), (89, 50), (256, 50), (512, 300)]


def main() -> None:
    cases = CASES
    if "--no-cap" in sys.argv[1:]:
        pp.RW_MAX_WORK = 10**12
        cases = [c for c in CASES if c != (512, 300)]  # minutes with the walker
    rng = np.random.default_rng(0)
    print(f"RW_MAX_WORK = {pp.RW_MAX_WORK}")
    print("| side | seeds | seeds x pixels | method | seconds |\n| ---: | ---: | ---: | --- | ---: |")
    for side, k in cases:
        semantic = np.clip(rng.normal(0.6, 0.2, (side, side)), 0, 1).astype(np.float32)
        seeds = np.zeros((side, side), np.int32)
        cells = rng.choice(side * side, k, replace=False)
        seeds.flat[cells] = np.arange(1, k + 1)
        work = side * side * k
        start = time.perf_counter()
        pp.random_walker_per_region({"semantic": semantic}, seeds, np.ones((side, side), bool))
        method = "walker" if work <= pp.RW_MAX_WORK else "watershed"
        print(f"| {side} | {k} | {work} | {method} | {time.perf_counter() - start:.2f} |", flush=True)


if __name__ == "__main__":
    main()
