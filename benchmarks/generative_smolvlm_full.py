"""One full explanation of the SmolVLM-256M shape on the CPU (8 x 8 grid plus every word,
73 inputs): ours (``explain``, caches cleared first) against the batched floor
(benchmarks/generative.py's definitions), alternating which goes first, two rounds, wall
clock, 2 torch threads, no warm-up (each run is minutes of vision-tower work, so the
first call's overhead is noise). Captum is left out: its word map is measured by
generative.py, and its image map costs the same 65 vision passes.

usage: PYTHONPATH=src:tests:benchmarks python benchmarks/generative_smolvlm_full.py
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import generative as g  # this folder (run as a script)
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explain import explain
from genvlm_toys import image


def main() -> None:
    torch.set_num_threads(2)
    adapter = g.smolvlm_256m_shaped("cpu")
    plain = GenerativeAdapter(adapter.module, adapter.processor, device=adapter.device,
                              batch_size=g.BATCH, reuse=False)
    pixels = image(5, g.SIZE)
    adapter.prepare(pixels, g.QUESTION)
    answer = list(adapter.answer_ids)
    images, questions = g.perturbed(pixels)
    batches = [adapter.encode(images[s:s + g.BATCH], questions[s:s + g.BATCH])
               for s in range(0, len(images), g.BATCH)]

    def ours() -> None:
        adapter.reuse.clear()
        explain(adapter, pixels, g.QUESTION, methods="occlusion", grid=g.GRID,
                baseline=",".join(map(str, g.FILL)), score="log-probability",
                batch_size=g.BATCH)

    def floor() -> None:
        for batch in batches:
            plain.token_logprobs(batch, answer)

    runs: list[tuple[str, Callable[[], None]]] = [("ours", ours), ("floor", floor)]
    times: dict[str, list[float]] = {"ours": [], "floor": []}
    for round_ in range(2):
        for name, fn in runs if round_ % 2 == 0 else runs[::-1]:
            started = time.perf_counter()
            fn()
            times[name].append(round(time.perf_counter() - started, 2))
            load = Path("/proc/loadavg").read_text(encoding="ascii").split()[0]
            print(name, times[name][-1], "load", load, flush=True)
    ratio = statistics.median(times["ours"]) / statistics.median(times["floor"])
    print(json.dumps({"inputs": len(images), "times": times, "ours_over_floor": round(ratio, 3)}))


if __name__ == "__main__":
    main()
