"""Where one generative explanation's CPU time goes, part by part, against the floor.

``PYTHONPATH=src:tests:benchmarks python benchmarks/generative_split.py tiny
ours,floor,ours_words,floor_words 7`` (or ``smolvlm ours_words 3``): the runs of
benchmarks/generative.py, each timed by this process's CPU time with one torch thread
after a warm-up, with the adapter's parts wrapped (outermost call of each counted once):
the processor (its image half and its tokenizer), the vision cache and tower, the
language model's forward calls (a forward hook), the teacher-forced scoring, the cached
path and ``explain``'s own scoring of the original. Medians of the repeats, in ms. The
parts nest (the processor holds its image half; the scoring holds the vision and the
language model); the explainer's bookkeeping is what the total leaves over.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import generative as bench
from blackbox_vqa.adapters.hf import generative as gen
from blackbox_vqa.adapters.hf import generative_reuse as reuse
from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.occlusion import Occlusion

CLOCK = time.process_time
spent: dict[str, float] = {}
_open: list[str] = []
_parts: list[str] = []  # in the order printed


def wrap(owner: Any, attr: str, name: str) -> None:
    """Count the CPU time of ``owner.attr`` under ``name`` (outermost calls only)."""
    inner = getattr(owner, attr)
    _parts.append(name)

    def run(*args: Any, **kwargs: Any) -> Any:
        started = CLOCK()
        _open.append(name)
        try:
            return inner(*args, **kwargs)
        finally:
            _open.pop()
            if name not in _open:
                spent[name] = spent.get(name, 0.0) + CLOCK() - started

    setattr(owner, attr, run)


def main() -> None:
    shape, which, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    torch.set_num_threads(1)
    adapter = bench.tiny_llava("cpu") if shape == "tiny" else bench.smolvlm_256m_shaped("cpu")
    plain = GenerativeAdapter(adapter.module, adapter.processor, device="cpu",
                              batch_size=bench.BATCH, reuse=False)
    from genvlm_toys import image

    pixels = image(5, bench.SIZE)
    adapter.prepare(pixels.astype("float32"), bench.QUESTION)  # as explain gives it
    answer = list(adapter.answer_ids)
    images, questions = bench.perturbed(pixels)
    size = bench.BATCH

    def encoded(items: list[int]) -> list[dict[str, torch.Tensor]]:
        return [adapter.encode([images[i] for i in items[s:s + size]],
                               [questions[i] for i in items[s:s + size]])
                for s in range(0, len(items), size)]

    all_batches = encoded(list(range(len(images))))
    word_batches = encoded(list(range(65, len(images)))) + encoded([0])

    def ours() -> None:
        adapter.reuse.clear()
        explain(adapter, pixels, bench.QUESTION, methods="occlusion", grid=bench.GRID,
                baseline=",".join(map(str, bench.FILL)), score="log-probability",
                batch_size=size)

    def ours_words() -> None:
        adapter.reuse.clear()
        Occlusion(adapter, image=False, words=True, batch_size=size,
                  score="log-probability").explain(pixels, bench.QUESTION)

    def floor() -> None:
        for batch in all_batches:
            plain.token_logprobs(batch, answer)

    def floor_words() -> None:
        for batch in word_batches:
            plain.token_logprobs(batch, answer)

    runs: dict[str, Callable[[], None]] = {"ours": ours, "floor": floor,
                                           "ours_words": ours_words,
                                           "floor_words": floor_words}
    processor = adapter.processor
    wrap(GenerativeAdapter, "encode", "processor (encode)")
    wrap(type(processor.image_processor), "__call__", "  its image half")
    wrap(type(processor.tokenizer), "__call__", "  its tokenizer")
    wrap(GenerativeAdapter, "token_logprobs", "scoring (token_logprobs)")
    wrap(reuse.Reuse, "picked", "  cached path (picked)")
    wrap(reuse.Reuse, "_features", "  vision: lookups and tower")
    wrap(adapter.module.model, "get_image_features", "  vision tower")
    wrap(GenerativeAdapter, "_predict_batch", "explain's own scoring of the original")
    wrap(gen, "image_key", "image keys (digests)")
    base = adapter.module.model
    decoder = base.get_decoder()
    _parts.insert(_parts.index("  vision tower") + 1, "  language model forward calls")
    started: list[float] = []
    decoder.register_forward_pre_hook(lambda *_: started.append(CLOCK()))
    decoder.register_forward_hook(lambda *_: spent.__setitem__(
        "  language model forward calls",
        spent.get("  language model forward calls", 0.0) + CLOCK() - started.pop()))
    for name in which:
        run = runs[name]
        run()
        rounds, totals = [], []
        for _ in range(repeats):
            spent.clear()
            begun = CLOCK()
            run()
            totals.append(CLOCK() - begun)
            rounds.append(dict(spent))
        print(f"{shape} {name}: total {statistics.median(totals) * 1e3:.2f} ms "
              f"(rounds {[round(t * 1e3, 1) for t in totals]})")
        for part in [p for p in _parts if any(p in r for r in rounds)]:
            median = statistics.median([r.get(part, 0.0) for r in rounds])
            print(f"  {part:44s} {median * 1e3:9.2f}")


if __name__ == "__main__":
    main()
