"""The CUDA paths: every adapter that picks CUDA when it is there gives the CPU's numbers.

Skipped without a GPU (CI has none); run on a GPU machine with
``PYTHONPATH=src:tests python -m pytest -s tests/test_cuda.py``. Each test prints the
largest difference it saw, so one run on a borrowed GPU tells how far apart the two are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

QUESTION = "what color is the shape"


def _reference(device: str) -> object:
    from blackbox_vqa.adapters.torch.module import TorchAdapter
    from blackbox_vqa.models.reference import load_reference_model

    module, tokenizer, answers, pre = load_reference_model(None)
    return TorchAdapter(
        module, answers, tokenizer,
        image_size=tuple(int(v) for v in pre["image_size"]),
        mean=tuple(float(v) for v in pre["mean"]), std=tuple(float(v) for v in pre["std"]),
        output=pre.get("output", "softmax"), device=device, name="easyvqa")


def _picture() -> np.ndarray:
    rng = np.random.default_rng(3)
    image = np.full((64, 64, 3), 255.0, dtype=np.float32)
    image[16:44, 20:48] = (30.0, 60.0, 220.0)
    return image + rng.uniform(0, 8, image.shape).astype(np.float32)


def _report(name: str, cpu: np.ndarray, gpu: np.ndarray) -> float:
    diff = float(np.max(np.abs(np.asarray(cpu, np.float64) - np.asarray(gpu, np.float64))))
    print(f"\n{name}: largest |cpu - cuda| = {diff:.3g}")
    return diff


def test_defaults_pick_cuda() -> None:
    from blackbox_vqa.models.reference import reference_adapter

    adapter = reference_adapter()
    assert adapter.device.type == "cuda"  # type: ignore[attr-defined]


def test_reference_model_methods_agree_with_the_cpu() -> None:
    from blackbox_vqa.explain import explain

    methods = ("occlusion", "rise", "guided-bp", "gradient", "integrated-gradients")
    image = _picture()
    cpu = explain(_reference("cpu"), image, QUESTION, methods=methods)
    gpu = explain(_reference("cuda"), image, QUESTION, methods=methods)
    assert gpu.answer == cpu.answer
    assert abs(gpu.probability - cpu.probability) < 1e-5
    worst = {}
    for method in methods:
        a, b = cpu.attribution(method), gpu.attribution(method)
        # Occlusion and RISE are differences of probabilities: compared absolutely. The
        # gradient maps relative to their largest value.
        scale = 1.0 if method in ("occlusion", "rise") else \
            max(float(np.max(np.abs(a.image_map))), 1e-12)
        worst[method] = _report(f"{method} image map", a.image_map, b.image_map) / scale
        if a.word_map.size:
            worst[method] = max(worst[method], _report(f"{method} word map", a.word_map,
                                                       b.word_map) / scale)
    assert max(worst.values()) < 1e-5, worst
    # TF32 is off only while the model runs (adapters/torch/forward.full_float32)
    assert torch.backends.cudnn.allow_tf32


def test_incremental_occlusion_on_cuda_equals_plain() -> None:
    from blackbox_vqa.explainers.occlusion import Occlusion

    adapter = _reference("cuda")
    image = _picture()
    plain = Occlusion(adapter, incremental="off").explain(image, QUESTION)
    fast = Occlusion(adapter).explain(image, QUESTION)
    assert _report("incremental vs plain on cuda", plain.image_map, fast.image_map) < 1e-5


def test_generative_llava_on_cuda(tmp_path: Path) -> None:
    from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
    from genvlm_toys import build, image

    folder = build("llava", tmp_path / "llava")
    picture = image(0, 40)
    cpu = GenerativeAdapter.from_pretrained(folder, device="cpu")
    gpu = GenerativeAdapter.from_pretrained(folder, device="cuda")
    assert gpu.generate_answer(picture, QUESTION) == cpu.generate_answer(picture, QUESTION)
    a = cpu.sequence_logprob(picture, QUESTION)
    b = gpu.sequence_logprob(picture, QUESTION)
    assert _report("llava sequence log-probability", np.array([a]), np.array([b])) < 1e-4
    from blackbox_vqa.explain import explain

    found_cpu = explain(cpu, picture, QUESTION, methods=("occlusion", "gradient"), grid=4)
    found_gpu = explain(gpu, picture, QUESTION, methods=("occlusion", "gradient"), grid=4)
    assert _report("llava occlusion", found_cpu.attribution("occlusion").image_map,
                   found_gpu.attribution("occlusion").image_map) < 1e-4
    grad_cpu = found_cpu.attribution("gradient").image_map
    grad_gpu = found_gpu.attribution("gradient").image_map
    scale = max(float(np.max(np.abs(grad_cpu))), 1e-12)
    assert _report("llava gradient", grad_cpu, grad_gpu) / scale < 1e-3


@pytest.mark.parametrize("family", ["qwen2vl", "idefics3"])
def test_generative_patch_and_tile_gradients_on_cuda(family: str, tmp_path: Path,
                                                      device: str = "cuda") -> None:
    """Qwen2-VL (patches unflattened to the image) and one-tile Idefics3: the gradient and
    integrated-gradients maps on CUDA are the CPU's."""
    from blackbox_vqa.adapters.hf.generative import GenerativeAdapter
    from blackbox_vqa.explain import explain
    from genvlm_toys import build, image

    folder = build(family, tmp_path / family)
    picture = image(3, 40)
    methods = ("gradient", "integrated-gradients")
    found = [explain(GenerativeAdapter.from_pretrained(folder, answer="blue square",
                                                       device=where),
                     picture, QUESTION, methods=methods, ig_steps=16)
             for where in ("cpu", device)]
    for method in methods:
        a, b = (f.attribution(method).image_map for f in found)
        scale = max(float(np.max(np.abs(a))), 1e-12)
        assert _report(f"{family} {method}", a, b) / scale < 1e-3


def test_vilt_on_cuda(tmp_path: Path) -> None:
    from blackbox_vqa.adapters.hf.vqa import HfAdapter

    from hf_toys import build_vilt

    folder = build_vilt(tmp_path / "vilt")
    picture = _picture()
    cpu = HfAdapter.from_pretrained(folder, device="cpu")
    gpu = HfAdapter.from_pretrained(folder, device="cuda")
    a = cpu.answer_probs_batch([picture, picture * 0.5], [QUESTION, "is it red"])
    b = gpu.answer_probs_batch([picture, picture * 0.5], [QUESTION, "is it red"])
    assert _report("vilt probabilities", a, b) < 1e-5
