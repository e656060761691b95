"""Export a Hugging Face VQA classifier (ViLT) to ONNX, verified against PyTorch.

``export_hf_model(adapter, out)`` writes into ``out``: ``model.onnx`` whose inputs are
the model's own (``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``,
``pixel_mask``; dynamic batch, question length and image size; output ``logits``), the
processor's files (``tokenizer.json``, ``preprocessor_config.json``...) and
``config.json``, and the metadata :class:`~blackbox_vqa.adapters.hf.onnx.HfOnnxAdapter`
reads. Only when the checks pass are the files moved into ``out``.

ViLT's patch sampling. ``ViltEmbeddings.visual_embed`` draws its image patches with
``torch.multinomial``: with ``max_image_length`` unset (``-1``, ViLT's VQA models) every
patch is kept, but in a random order, which the exporters cannot trace. For export only
(on a private copy of the model), it is replaced by the path it takes when every patch is
kept, in order; attention does not depend on the order of its tokens, so the logits are
the same up to rounding. The exporter measures that on the check inputs (pixel mask all
ones: one image size per call) and refuses to go on above the tolerance
(``patch_path_max_diff``). A model whose ``max_image_length`` drops patches is refused.

Checks: the scores of ONNX Runtime against the PyTorch adapter on images of two sizes and
questions of several lengths (``onnx_max_diff`` within the tolerance, the same top answer
on every input). Generative models (BLIP) are refused: their scores come from a decoder
run once per candidate answer, which this exporter does not build.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blackbox_vqa.adapters.base import ImageArray
from blackbox_vqa.adapters.hf.onnx import HfOnnxAdapter, hf_export_props
from blackbox_vqa.adapters.hf.vqa import HfAdapter
from blackbox_vqa.adapters.onnx.runtime import drop_sessions
from blackbox_vqa.errors import InputError, ModelError, NotSupportedError

__all__ = ["HfExportResult", "all_patches_kept", "export_hf_model"]

ONNX_FILE = "model.onnx"
DEFAULT_QUESTIONS = ("what color is the shape?", "how many?", "is it red")


@dataclass(frozen=True)
class HfExportResult:
    """What ``export_hf_model`` wrote and measured.

    Attributes:
        folder, onnx_path: the output folder and its ``model.onnx``.
        inputs: the graph's input names, in order.
        patch_path_max_diff: max |logit difference| of the deterministic all-patches path
            against the model's own forward (``0.0`` for models without one).
        onnx_max_diff: max |score difference| of ONNX Runtime against PyTorch.
        samples: number of check inputs.
        seconds: wall-clock time of the export and checks.
    """

    folder: Path
    onnx_path: Path
    inputs: tuple[str, ...]
    patch_path_max_diff: float
    onnx_max_diff: float
    samples: int
    seconds: float


def all_patches_kept(
    self: Any, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, max_image_length: int = -1
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, tuple[int, int]]]:
    """``ViltEmbeddings.visual_embed`` when every patch is kept, in order (no sampling).

    Same outputs as ViLT's own method for a pixel mask of all ones, but for the order of
    the patch tokens: patch embeddings plus position embeddings interpolated (bilinear,
    corners aligned) to the patch grid, the class token first, the mask from
    ``pixel_mask``.
    """
    x = self.patch_embeddings(pixel_values)
    batch, channels, height, width = x.shape
    mask = nn.functional.interpolate(pixel_mask[:, None].float(), size=(height, width)).long()
    grid = self.config.image_size // self.config.patch_size
    spatial = self.position_embeddings[:, 1:, :].transpose(1, 2).view(1, channels, grid, grid)
    pos = nn.functional.interpolate(spatial, size=(height, width), mode="bilinear",
                                    align_corners=True)
    pos = pos.flatten(2).transpose(1, 2).expand(batch, -1, -1)
    rows = torch.arange(height, device=x.device).view(height, 1).expand(height, width)
    cols = torch.arange(width, device=x.device).view(1, width).expand(height, width)
    patch_index = torch.stack([rows, cols], dim=-1).flatten(0, 1)[None].expand(batch, -1, -1)
    tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.flatten(2).transpose(1, 2)),
                       dim=1)
    first = self.position_embeddings[:, 0, :][:, None, :].expand(batch, -1, -1)
    tokens = self.dropout(tokens + torch.cat((first, pos), dim=1))
    flat = mask.flatten(1)
    flat = torch.cat([torch.ones(batch, 1).to(flat), flat], dim=1)
    return tokens, flat, (patch_index, (height, width))


class _Logits(nn.Module):
    """The model's ``forward(**inputs).logits`` with positional inputs in a fixed order."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args, strict=True))).logits  # type: ignore[no-any-return]


def export_hf_model(
    adapter: HfAdapter,
    out: str | Path,
    *,
    samples: Sequence[tuple[ImageArray, str]] | None = None,
    opset: int = 17,
    tolerance: float = 1e-4,
    force: bool = False,
) -> HfExportResult:
    """Export ``adapter``'s model to ``out`` (see the module docstring); nothing is left in
    ``out`` when a check fails. Raises :class:`NotSupportedError` for models it cannot
    export and :class:`ModelError` when a check fails."""
    start = time.perf_counter()
    if adapter.kind != "classifier":
        raise NotSupportedError(
            f"{adapter.name} is generative (its scores run the decoder once per candidate "
            "answer); ONNX export supports classifier models such as ViLT"
        )
    folder = _output_folder(Path(out), force)
    checks = list(samples) if samples is not None else default_samples()
    module = _export_copy(adapter)
    names = _input_names(adapter)
    patch_diff = _patch_path_diff(adapter, module, checks)
    if patch_diff > tolerance:
        raise ModelError(
            f"the all-patches path differs from {adapter.name}'s forward by {patch_diff:.3g} "
            f"(tolerance {tolerance:g}); not exported"
        )
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        _write(adapter, module, names, staging, opset, patch_diff)
        onnx_diff = _verify(adapter, staging, checks, tolerance)
        for item in staging.iterdir():
            shutil.move(str(item), folder / item.name)
    finally:
        drop_sessions(staging)
        shutil.rmtree(staging, ignore_errors=True)
    return HfExportResult(
        folder=folder, onnx_path=folder / ONNX_FILE, inputs=names,
        patch_path_max_diff=patch_diff, onnx_max_diff=onnx_diff, samples=len(checks),
        seconds=time.perf_counter() - start,
    )


def default_samples() -> list[tuple[ImageArray, str]]:
    """Check inputs: random images of two sizes (one not square) and three questions."""
    rng = np.random.default_rng(0)
    out: list[tuple[ImageArray, str]] = []
    for shape in ((64, 64, 3), (48, 80, 3)):
        for question in DEFAULT_QUESTIONS:
            out.append((rng.integers(0, 256, size=shape).astype(np.uint8), question))
    return out


def _output_folder(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if (out / ONNX_FILE).exists() and not force:
        raise InputError(f"{out} already holds {ONNX_FILE}; choose another folder or force")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _export_copy(adapter: HfAdapter) -> nn.Module:
    """A private eval-mode CPU copy; ViLT's patch sampling replaced by the all-patches path."""
    module: Any = copy.deepcopy(adapter.module).float().cpu().eval()
    embeddings = getattr(getattr(module, "vilt", None), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "visual_embed"):
        limit = getattr(module.config, "max_image_length", -1)
        if isinstance(limit, int) and limit > 0:
            raise NotSupportedError(
                f"{adapter.name} keeps at most {limit} image patches (max_image_length), "
                "drawn at random; only models that keep every patch (-1) can be exported"
            )
        embeddings.visual_embed = types.MethodType(all_patches_kept, embeddings)
    return module  # type: ignore[no-any-return]


def _input_names(adapter: HfAdapter) -> tuple[str, ...]:
    names = list(adapter.processing.text_names)
    names.append("pixel_values")
    if adapter.processing.takes_pixel_mask:
        names.append("pixel_mask")
    return tuple(names)


def _inputs(adapter: HfAdapter, images: Sequence[ImageArray], questions: Sequence[str],
            names: Sequence[str]) -> list[torch.Tensor]:
    tensors = {**adapter.processing.pixels(images), **adapter.processing.text(questions)}
    return [tensors[n] for n in names]


def _by_size(checks: Sequence[tuple[ImageArray, str]]) -> Iterator[
    tuple[list[ImageArray], list[str]]
]:
    groups: dict[tuple[int, ...], list[tuple[ImageArray, str]]] = {}
    for image, question in checks:
        groups.setdefault(tuple(np.shape(image)), []).append((image, question))
    for items in groups.values():
        yield [i for i, _ in items], [q for _, q in items]


def _patch_path_diff(adapter: HfAdapter, module: nn.Module,
                     checks: Sequence[tuple[ImageArray, str]]) -> float:
    """Max |logit difference| of ``module`` against the adapter's model on ``checks``."""
    names = _input_names(adapter)
    original: Any = adapter.module
    worst = 0.0
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        training = original.training
        original.eval()
        try:
            for images, questions in _by_size(checks):
                args = _inputs(adapter, images, questions, names)
                ours = _Logits(module, names)(*args)
                theirs = original(**{n: a.to(adapter.device) for n, a in zip(
                    names, args, strict=True)}).logits.float().cpu()
                worst = max(worst, float((ours - theirs).abs().max()))
        finally:
            original.train(training)
    return worst


def _write(adapter: HfAdapter, module: nn.Module, names: tuple[str, ...], folder: Path,
           opset: int, patch_diff: float) -> None:
    import onnx

    images = [np.zeros((64, 80, 3), dtype=np.uint8)]
    example = tuple(_inputs(adapter, images, ["what color is it?"], names))
    dynamic = {n: ({0: "batch", 1: "tokens"} if n not in ("pixel_values", "pixel_mask")
                   else {0: "batch", 2: "height", 3: "width"} if n == "pixel_values"
                   else {0: "batch", 1: "height", 2: "width"}) for n in names}
    dynamic["logits"] = {0: "batch"}
    path = folder / ONNX_FILE
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Logits(module, names).eval(), example, str(path), dynamo=False,
                              input_names=list(names), output_names=["logits"],
                              dynamic_axes=dynamic, opset_version=opset)
    except Exception as exc:
        raise NotSupportedError(
            f"{adapter.name} could not be exported to ONNX: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    proto = onnx.load(str(path))
    note = (f"ViLT patch sampling replaced by the all-patches path (max logit difference "
            f"{patch_diff:.3g})") if patch_diff else ""
    props = hf_export_props(adapter.answers, adapter.output, names, adapter.name, note)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    adapter.processor.save_pretrained(str(folder))
    adapter.module.config.save_pretrained(str(folder))


def _verify(adapter: HfAdapter, folder: Path, checks: Sequence[tuple[ImageArray, str]],
            tolerance: float) -> float:
    exported = HfOnnxAdapter(folder / ONNX_FILE)
    images = [image for image, _ in checks]
    questions = [question for _, question in checks]
    theirs = adapter.answer_probs_batch(images, questions)
    ours = exported.answer_probs_batch(images, questions)
    diff = float(np.abs(ours - theirs).max())
    same_top = bool((ours.argmax(axis=1) == theirs.argmax(axis=1)).all())
    if diff > tolerance or not same_top:
        raise ModelError(
            f"ONNX Runtime's scores differ from PyTorch's by {diff:.3g} (tolerance "
            f"{tolerance:g}; same top answer on every input: {same_top}); not exported"
        )
    return diff
