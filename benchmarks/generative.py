"""One explanation of a tiny LLaVA-shaped generative VLM (8 x 8 image grid plus every word,
a 3-token answer), side by side in one process: ours (``explain`` with occlusion, batched
teacher forcing), the batched floor (the model's own batched teacher-forced forwards over
the same perturbed inputs, pre-built) and Captum 0.9 (``LLMAttribution(FeatureAblation)``
over an ``ImageMaskInput`` and a ``TextTemplateInput``, ``forward_in_tokens=False``).

usage: PYTHONPATH=src:tests python benchmarks/generative.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explain import explain

QUESTION = "what color is the shape in the image"
GRID, SIZE = 8, 64
FILL = (10, 200, 30)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``repeats`` runs, then the peak memory traced by ``tracemalloc``
    (MiB; Python and NumPy allocations, not torch's) in one more, untimed run."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from genvlm_toys import build, image

    folder = build("llava", Path(tempfile.mkdtemp()) / "llava")
    adapter = GenerativeAdapter.from_pretrained(folder, max_tokens=3, device="cpu",
                                                batch_size=32)
    pixels = image(5, SIZE)
    adapter.prepare(pixels, QUESTION)
    answer = list(adapter.answer_ids)
    words = QUESTION.split()

    def ours() -> None:
        explain(adapter, pixels, QUESTION, methods="occlusion", grid=GRID,
                baseline=",".join(map(str, FILL)), score="log-probability", batch_size=32)

    cell = SIZE // GRID
    images, questions = [pixels], [QUESTION]
    for r in range(GRID):
        for c in range(GRID):
            occluded = pixels.copy()
            occluded[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = FILL
            images.append(occluded)
            questions.append(QUESTION)
    for i in range(len(words)):
        images.append(pixels)
        questions.append(" ".join(words[:i] + words[i + 1:]))
    batches = [adapter.encode(images[s:s + 32], questions[s:s + 32])
               for s in range(0, len(images), 32)]

    def floor() -> None:
        for encoded in batches:
            adapter.token_logprobs(encoded, answer)

    from captum.attr import FeatureAblation, LLMAttribution
    from captum.attr._utils.interpretable_input import ImageMaskInput, TextTemplateInput
    from PIL import Image

    processor, model = adapter.processor, adapter.module
    llm = LLMAttribution(FeatureAblation(model), adapter.tokenizer)
    target = torch.tensor(answer)

    def inputs(picture: Any, question: str) -> Any:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        return processor(text=prompt, images=picture, return_tensors="pt")

    mask = torch.zeros((SIZE, SIZE), dtype=torch.int64)
    for r in range(GRID):
        for c in range(GRID):
            mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = r * GRID + c
    picture = Image.fromarray(pixels)

    def captum_image() -> None:
        cells = ImageMaskInput(image=picture, mask=mask, baseline=FILL,
                               processor_fn=lambda im: inputs(im, QUESTION))
        with torch.no_grad():
            llm.attribute(cells, target=target, forward_in_tokens=False)

    def captum_words() -> None:
        text = TextTemplateInput(
            template=lambda *kept: inputs(picture, " ".join(w for w in kept if w)),
            values=words)
        with torch.no_grad():
            llm.attribute(text, target=target, forward_in_tokens=False)

    def captum() -> None:
        captum_image()
        captum_words()

    found = {}
    for name, fn in (("ours", ours), ("floor", floor), ("captum", captum)):
        fn()  # warm-up
        found[name] = timed(fn, args.repeats)
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads, "inputs": len(images), "answer_tokens": len(answer),
        "median_s": {k: round(v[0], 3) for k, v in found.items()},
        "peak_python_mib": {k: round(v[1], 1) for k, v in found.items()},
        "ours_over_floor": round(found["ours"][0] / found["floor"][0], 3),
        "captum_over_ours": round(found["captum"][0] / found["ours"][0], 2),
    }, indent=1))


if __name__ == "__main__":
    main()
