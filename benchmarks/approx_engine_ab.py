"""A/B of approximate occlusion's engine (issue 22, approx4): the same explanations with
the engine of another checkout (``--old-src``, e.g. ``git archive`` of approx3's last
commit: whole maps past the 0.75 read share) and this one (the cheaper way by positions
computed), swapped on the adapter in one process, interleaved per round; CPU time of
this process (``time.process_time``), one torch thread, medians. Also the largest
difference of the maps.

Run ``python benchmarks/approx_engine_ab.py --help``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from approx import _case, ab_parser, ab_runs, old_engine_module  # this folder (run as a script)
from blackbox_vqa.adapters.torch.incremental.engine import IncrementalEngine


def _old_engine_class(src: Path) -> Any:
    return old_engine_module(src).IncrementalEngine


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser(__doc__.splitlines()[0], models="resnet18,vgg16-gap",
                       modes="approx:0.5,approx:0.6")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps({"load_average_start": os.getloadavg()}), flush=True)
    old_class = _old_engine_class(args.old_src)
    for name in args.models.split(","):
        case = _case(name)
        scorer = case.adapter.incremental  # type: ignore[attr-defined]
        module = case.adapter.module  # type: ignore[attr-defined]
        engines = {"old": old_class(module), "new": IncrementalEngine(module)}
        use = {k: partial(setattr, scorer, "_engine", e) for k, e in engines.items()}
        for mode in args.modes.split(","):
            times, maps = ab_runs(use, case, args.grid, mode, args.rounds)
            median = {k: statistics.median(v) for k, v in times.items()}
            diff = float(np.abs(maps["new"] - maps["old"]).max())
            print(f"{name:10s} {mode:11s} " + "  ".join(
                f"{k} {v:6.2f} s" for k, v in median.items())
                + f"  new/old {median['new'] / median['old']:5.3f}"
                + f"  max|map - old| {diff}  runs {times}", flush=True)
        scorer._engine = None
    print(json.dumps({"load_average_end": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
