"""One explanation of a generative VLM (8 x 8 image grid plus every word, a 3-token answer)
on two shapes, side by side in one process: ours (``explain`` with occlusion: batched
teacher forcing, vision output and prompt-prefix KV cache reused), the batched floor (the
model's own batched teacher-forced forwards over the same perturbed inputs, pre-encoded,
no reuse; ``processor``: the plain processor call that encodes them, batch by batch, timed
apart so that ``floor + processor`` is a second reference) and Captum 0.9
(``LLMAttribution(FeatureAblation)`` over an ``ImageMaskInput`` and a ``TextTemplateInput``,
``forward_in_tokens=False``); then the word map alone.

Shapes: ``tiny`` (tests/genvlm_toys.py's LLaVA: CLIP 2 x 32, Llama 2 x 64; overhead-
dominated) and ``smolvlm`` (an Idefics3 model with SmolVLM-256M's sizes: SigLIP 12 x 768,
patch 16, 512 x 512, one tile, no image splitting, scale factor 4 (64 image tokens);
SmolLM2-135M's Llama 30 x 576, 9 heads, 3 key/value heads, intermediate 1536, vocabulary
49280; random weights; compute-dominated).

Every run gets one warm-up, then the runs are interleaved (one of each per round); the
median of the rounds is reported. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
over the run minus the memory allocated before it; on CPU the peak resident set
(``/proc/self/statm``, sampled every 2 ms by a thread) minus the resident set before the
run (tracemalloc does not see torch).

usage: PYTHONPATH=src:tests python benchmarks/generative.py [--shapes tiny,smolvlm]
       [--repeats 3] [--captum-repeats N] [--threads 2] [--device cpu|cuda]
       [--words-only smolvlm] [--clock wall|cpu]

``--clock cpu`` times every run by this process's CPU time instead of the wall clock:
with ``--threads 1`` that is the work done, which a machine shared with other jobs
inflates far less than the wall time (CPU runs only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
from blackbox_vqa.explain import explain
from blackbox_vqa.explainers.occlusion import Occlusion

QUESTION = "what color is the shape in the image"
GRID, SIZE, BATCH = 8, 64, 32
FILL = (10, 200, 30)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory of a block above its start (MiB); see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._rss()
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.mib = (peak - self._start) / 2**20


#: the clock of every figure: wall time, or with ``--clock cpu`` this process's CPU time
#: (all its threads; with ``--threads 1`` the work done, less sensitive to a loaded machine)
CLOCK: Callable[[], float] = time.perf_counter


def timed(plan: list[tuple[str, Callable[[], Any], int]], device: torch.device
          ) -> dict[str, dict[str, float]]:
    """Median seconds and peak memory above the start (MiB) of each ``(name, fn, repeats)``
    after one warm-up run of each; the runs are interleaved (one of each per round) so
    that a change of load on a shared machine falls on all of them alike."""
    for _, fn, _ in plan:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    peaks: dict[str, float] = dict.fromkeys(times, 0.0)
    for round_ in range(max(repeats for _, _, repeats in plan)):
        for name, fn, repeats in plan:
            if round_ >= repeats:
                continue
            with Peak(device) as peak:
                _sync(device)
                started = CLOCK()
                fn()
                _sync(device)
                times[name].append(CLOCK() - started)
            peaks[name] = max(peaks[name], peak.mib)
    return {name: {"s": round(statistics.median(times[name]), 4),
                   "peak_mib": round(peaks[name], 1),
                   "all_s": [round(t, 3) for t in times[name]]} for name in times}


def smolvlm_256m_shaped(device: str) -> GenerativeAdapter:
    """An Idefics3 model with SmolVLM-256M's layer sizes, random weights, a 3-token answer."""
    import transformers as tf

    from genvlm_toys import _IDEFICS_TEMPLATE, _tokenizer

    torch.manual_seed(0)
    tokenizer = _tokenizer("idefics3")
    vision = tf.Idefics3VisionConfig(hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12,
                                     image_size=512, patch_size=16)
    text = tf.LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          max_position_embeddings=8192,
                          rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                          rms_norm_eps=1e-5, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    config = tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=4,
                               image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                               tie_word_embeddings=True)
    model = tf.Idefics3ForConditionalGeneration(config).eval()
    images = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 512},
                                       max_image_size={"longest_edge": 512})
    processor = tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer,
                                     image_seq_len=64, chat_template=_IDEFICS_TEMPLATE)
    adapter = GenerativeAdapter(model, processor, device=device, batch_size=BATCH,
                                name="smolvlm-256m-shaped")
    ids = tokenizer(" red green blue", add_special_tokens=False)["input_ids"][:3]
    adapter._set_answer("(3 tokens)", ids, eos_included=False, eos=None)
    adapter._fixed = True  # random weights: explain 3 given tokens, not a generation
    return adapter


def tiny_llava(device: str) -> GenerativeAdapter:
    from genvlm_toys import build

    folder = build("llava", Path(tempfile.mkdtemp()) / "llava")
    return GenerativeAdapter.from_pretrained(folder, max_tokens=3, device=device,
                                             batch_size=BATCH)


def perturbed(pixels: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """The 73 inputs of one explanation, in occlusion's order: original, cells, words."""
    cell = SIZE // GRID
    words = QUESTION.split()
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
    return images, questions


def captum_runs(adapter: GenerativeAdapter, pixels: np.ndarray, answer: list[int]
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """Captum 0.9's image map and word map (see docs/models/generative.md's mapping)."""
    from captum.attr import FeatureAblation, LLMAttribution
    from captum.attr._utils.interpretable_input import ImageMaskInput, TextTemplateInput
    from PIL import Image

    processor, model, device = adapter.processor, adapter.module, adapter.device
    llm = LLMAttribution(FeatureAblation(model), adapter.tokenizer)
    target = torch.tensor(answer)

    def inputs(picture: Any, question: str) -> Any:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        return processor(text=prompt, images=picture, return_tensors="pt").to(device)

    cell = SIZE // GRID
    mask = torch.zeros((SIZE, SIZE), dtype=torch.int64)
    for r in range(GRID):
        for c in range(GRID):
            mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = r * GRID + c
    picture = Image.fromarray(pixels)

    def image_map() -> None:
        cells = ImageMaskInput(image=picture, mask=mask, baseline=FILL,
                               processor_fn=lambda im: inputs(im, QUESTION))
        with torch.no_grad():
            llm.attribute(cells, target=target, forward_in_tokens=False)

    def word_map() -> None:
        text = TextTemplateInput(
            template=lambda *kept: inputs(picture, " ".join(w for w in kept if w)),
            values=QUESTION.split())
        with torch.no_grad():
            llm.attribute(text, target=target, forward_in_tokens=False)

    return image_map, word_map


def vision_split(adapter: GenerativeAdapter, fn: Callable[[], None]) -> dict[str, float]:
    """Seconds of one run spent in the vision tower (+ projector), in the processor, and
    in the rest (language model, bookkeeping). The processor runs in turn with the rest here
    (no prefetching of the next batch on a worker thread, as ours does on CUDA)."""
    base, device = adapter.module.model, adapter.device
    spent = {"vision": 0.0, "processor": 0.0}
    features, encode = base.get_image_features, adapter.encode

    def wrap(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            started = CLOCK()
            out = inner(*args, **kwargs)
            _sync(device)
            spent[name] += CLOCK() - started
            return out
        return run

    base.get_image_features = wrap("vision", features)
    adapter.encode = wrap("processor", encode)  # type: ignore[method-assign]
    prefetch, adapter.prefetch = getattr(adapter, "prefetch", False), False
    try:
        _sync(device)
        started = CLOCK()
        fn()
        _sync(device)
        total = CLOCK() - started
    finally:
        del base.get_image_features
        del adapter.encode
        adapter.prefetch = prefetch
    return {"total_s": round(total, 4), "vision_s": round(spent["vision"], 4),
            "processor_s": round(spent["processor"], 4),
            "language_model_and_rest_s": round(total - spent["vision"] - spent["processor"], 4)}


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    adapter = tiny_llava(args.device) if shape == "tiny" else smolvlm_256m_shaped(args.device)
    device = adapter.device
    plain = GenerativeAdapter(adapter.module, adapter.processor, device=device,
                              batch_size=BATCH, reuse=False)
    from genvlm_toys import image

    pixels = image(5, SIZE)
    adapter.prepare(pixels, QUESTION)
    answer = list(adapter.answer_ids)
    images, questions = perturbed(pixels)
    words = 1 + GRID * GRID

    def encoded(items: range) -> list[dict[str, torch.Tensor]]:
        picked = list(items)
        return [adapter.encode([images[i] for i in picked[s:s + BATCH]],
                               [questions[i] for i in picked[s:s + BATCH]])
                for s in range(0, len(picked), BATCH)]

    all_batches = encoded(range(len(images)))
    word_batches = encoded(range(words, len(images))) + encoded(range(1))

    def ours() -> None:
        adapter.reuse.clear()  # every explanation starts cold
        explain(adapter, pixels, QUESTION, methods="occlusion", grid=GRID,
                baseline=",".join(map(str, FILL)), score="log-probability", batch_size=BATCH)

    def ours_words() -> None:
        adapter.reuse.clear()
        Occlusion(adapter, image=False, words=True, batch_size=BATCH,
                  score="log-probability").explain(pixels, QUESTION)

    def floor() -> None:
        for batch in all_batches:
            plain.token_logprobs(batch, answer)

    def processed(items: list[int]) -> None:
        """The model's own processor on the inputs, one plain call per batch (no input
        processed once for all its rows): what the floor is given ready-made."""
        processor = adapter.processor
        for s in range(0, len(items), BATCH):
            rows = items[s:s + BATCH]
            prompts = [adapter.prompts(questions[i]) for i in rows]
            processor(text=prompts, images=[[images[i]] for i in rows], padding=True,
                      return_tensors="pt")

    def processor() -> None:
        processed(list(range(len(images))))

    def processor_words() -> None:
        processed(list(range(words, len(images))))
        processed([0])

    def floor_words() -> None:
        for batch in word_batches:
            plain.token_logprobs(batch, answer)

    captum_image, captum_words = captum_runs(adapter, pixels, answer)

    def captum() -> None:
        captum_image()
        captum_words()

    words_only = shape in args.words_only.split(",")
    plan = [("ours_words", ours_words, args.repeats), ("floor_words", floor_words, args.repeats),
            ("processor_words", processor_words, args.repeats),
            ("captum_words", captum_words, args.repeats)]
    if not words_only:
        plan = [("ours", ours, args.repeats), ("floor", floor, args.repeats),
                ("processor", processor, args.repeats),
                ("captum", captum, args.captum_repeats or args.repeats), *plan]
    found = timed(plan, device)
    print(shape, found, flush=True)
    result: dict[str, Any] = {"shape": shape, "inputs": len(images) if not words_only
                              else len(images) - words + 1, "answer_tokens": len(answer),
                              "runs": found}
    split = {"ours_words": vision_split(adapter, ours_words),
             "floor_words": vision_split(adapter, floor_words)}
    if not words_only:
        split["ours"] = vision_split(adapter, ours)
        split["floor"] = vision_split(adapter, floor)
        result["ours_over_floor"] = round(found["ours"]["s"] / found["floor"]["s"], 3)
        result["ours_over_floor_and_processor"] = round(
            found["ours"]["s"] / (found["floor"]["s"] + found["processor"]["s"]), 3)
        result["captum_over_ours"] = round(found["captum"]["s"] / found["ours"]["s"], 2)
    result["split_one_run"] = split
    result["vision_per_image_s"] = vision_probe(adapter, all_batches[0])
    result["words_ours_over_floor"] = round(found["ours_words"]["s"] / found["floor_words"]["s"],
                                            3)
    result["words_ours_over_floor_and_processor"] = round(
        found["ours_words"]["s"] / (found["floor_words"]["s"] + found["processor_words"]["s"]), 3)
    result["words_captum_over_ours"] = round(
        found["captum_words"]["s"] / found["ours_words"]["s"], 2)
    return result


def vision_probe(adapter: GenerativeAdapter, batch: dict[str, torch.Tensor]) -> float:
    """Seconds per image of one batched vision-tower (+ projector) pass over the first 8
    inputs of ``batch``: exact image occlusion needs one such pass per perturbed image."""
    pixels = {k: batch[k][:8] for k in ("pixel_values", "pixel_attention_mask") if k in batch}
    base, device = adapter.module.model, adapter.device
    with torch.inference_mode():
        _sync(device)
        started = CLOCK()
        base.get_image_features(**pixels)
        _sync(device)
    return round((CLOCK() - started) / pixels["pixel_values"].shape[0], 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="tiny,smolvlm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--captum-repeats", type=int, default=0,
                        help="repeats of the full Captum run (default: --repeats)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--words-only", default="",
                        help="shapes (comma-separated) to run the word map alone on")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (CPU runs only)")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures CPU runs only")
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = [round(x, 2) for x in os.getloadavg()]
    results = [run_shape(shape, args) for shape in args.shapes.split(",")]
    print(json.dumps({
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "clock": args.clock, "load_average_start": load,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
