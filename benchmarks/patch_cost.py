"""Cost of one output position computed on patches against one on the whole map (issue 22):
the figure behind the engine's ``PATCH_COST``.

For a batch of 64 perturbations of one map (3 x 3 convolution, padding 1, random
weights), the patched way gathers each item's ``h x h`` output patch's input window (halo
included) from the original with the patch pasted (``_Patched.crop``, as the engine does)
and convolves it unpadded; the whole-map way pastes the patches into full maps
(``_Patched.full``) and convolves them padded. Printed: CPU time per output position of
the patched way over the whole map's (``k``), medians of interleaved rounds, this
process's CPU time with one thread.

``PYTHONPATH=src:tests:benchmarks python benchmarks/patch_cost.py --rounds 5``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from blackbox_vqa.adapters.torch.incremental.engine import _Patched

# (channels, map side, patch sides): ResNet-18's stages, VGG-16's (widths halved)
CASES = ((512, 7, (3, 4, 5)), (256, 14, (5, 7, 9)), (256, 28, (9, 13)),
         (128, 56, (9, 15)), (64, 112, (15,)))
BATCH = 64


def _timed(work: Callable[[], torch.Tensor]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _patched(value: _Patched, weight: torch.Tensor) -> torch.Tensor:
    """The engine's way: gather each patch's window with its halo, convolve unpadded."""
    h, w = value.patch.shape[2:]
    window = value.crop(value.top - 1, h + 2, value.left - 1, w + 2, 0.0)
    return F.conv2d(window, weight)


def _whole(value: _Patched, weight: torch.Tensor) -> torch.Tensor:
    """Paste the patches into full maps, convolve padded."""
    return F.conv2d(value.full(), weight, padding=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("channels map patch | patch CPU ms | whole CPU ms | k (per position)")
    for channels, side, patches in CASES:
        weight = torch.randn(channels, channels, 3, 3, generator=gen) / (3 * channels**0.5)
        base = torch.randn(1, channels, side, side, generator=gen)
        for h in patches:
            top = torch.randint(0, side - h + 1, (BATCH,), generator=gen)
            left = torch.randint(0, side - h + 1, (BATCH,), generator=gen)
            value = _Patched(base, torch.randn(BATCH, channels, h, h, generator=gen), top, left)
            patched = partial(_patched, value, weight)
            whole = partial(_whole, value, weight)

            with torch.inference_mode():
                patched(), whole()  # warm-up
                times: tuple[list[float], list[float]] = ([], [])
                for _ in range(args.rounds):
                    times[0].append(_timed(patched))
                    times[1].append(_timed(whole))
            p, w = statistics.median(times[0]), statistics.median(times[1])
            k = (p / (h * h)) / (w / (side * side))
            print(f"{channels:8d} {side:3d} {h:5d} | {1e3 * p:11.1f} | {1e3 * w:12.1f} | {k:.2f}")


if __name__ == "__main__":
    main()
