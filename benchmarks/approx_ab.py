"""A/B of one engine change (issue 22): the same explanations with ``_Patched.crop`` from
another checkout's engine (``--old-src``, e.g. ``git archive`` of the commit before) and
from this one, swapped on the class in one process, interleaved per round; CPU time of
this process (``time.process_time``), one torch thread, medians. The maps of both are
compared (they must be identical).

Run ``python benchmarks/approx_ab.py --help``.
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
from blackbox_vqa.adapters.torch.incremental import engine


def _old_crop(src: Path) -> Any:
    return old_engine_module(src)._Patched.crop


def main(argv: list[str] | None = None) -> int:
    parser = ab_parser(__doc__.splitlines()[0], models="vgg16-gap,resnet18,vgg16",
                       modes="approx:0.5,exact")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    crops = {"old": _old_crop(args.old_src), "new": engine._Patched.crop}
    use = {k: partial(setattr, engine._Patched, "crop", c) for k, c in crops.items()}
    print(json.dumps({"load_average_start": os.getloadavg()}), flush=True)
    for name in args.models.split(","):
        case = _case(name)
        for mode in args.modes.split(","):
            times, maps = ab_runs(use, case, args.grid, mode, args.rounds)
            old, new = (statistics.median(times[k]) for k in ("old", "new"))
            same = bool(np.array_equal(maps["old"], maps["new"]))
            print(f"{name:10s} {mode:11s} old {old:6.2f} s  new {new:6.2f} s  "
                  f"new/old {new / old:5.3f}  maps identical {same}  runs {times}",
                  flush=True)
    engine._Patched.crop = crops["new"]  # type: ignore[method-assign]
    print(json.dumps({"load_average_end": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
