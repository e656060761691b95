"""``PATH.onnx``: an ONNX file (written by ``bbvqa export``, or a third party's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blackbox_vqa.adapters.base import OUTPUT_KINDS
from blackbox_vqa.errors import InputError
from blackbox_vqa.kinds.common import ANSWERS, THREADS
from blackbox_vqa.specs import KindOption, ModelKind, ModelOptions

__all__ = ["KIND"]


def _output_kind(value: Any) -> None:
    if value not in OUTPUT_KINDS:
        raise InputError(f"--output-kind must be one of {', '.join(OUTPUT_KINDS)}, "
                         f"got {value!r}")


_OPTIONS = (
    ANSWERS,
    KindOption("vocab", Path,
               help="ONNX file without metadata: its vocabulary (JSON word->id, or one word "
               "per line, ids from 2)."),
    KindOption("image_size", str, help="ONNX file: model input size N or HxW."),
    KindOption("mean", str, help="ONNX file: normalisation mean 'r,g,b' (0-1 scale; default "
               "ImageNet's)."),
    KindOption("std", str, help="ONNX file: normalisation std 'r,g,b' (0-1 scale; default "
               "ImageNet's)."),
    KindOption("output_kind", str, check=_output_kind,
               help="ONNX file: its output is softmax (logits), sigmoid (logits) or probs."),
    KindOption("image_input", str,
               help="ONNX file: name of the image input (default: found by type)."),
    KindOption("tokens_input", str,
               help="ONNX file: name of the token input (default: found by type)."),
    KindOption("output_name", str,
               help="ONNX file: name of the score output (default: the only one)."),
    THREADS,
)
# Option name -> the adapters' ``from_options`` key.
_KEYS = {"vocab": "vocab_file", "output_kind": "output"}


def _load(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.hf.onnx import HfOnnxAdapter, is_hf_export
    from blackbox_vqa.adapters.onnx.runtime import OnnxAdapter

    extra = {_KEYS.get(name, name): value for name, value in options.extra.items()}
    if is_hf_export(spec.strip()):  # a multi-input graph described by its metadata
        return HfOnnxAdapter.from_options(spec.strip(), extra)
    return OnnxAdapter.from_options(spec.strip(), extra)


KIND = ModelKind(
    name="onnx", syntax="PATH.onnx", audience=".onnx",
    matches=lambda spec: spec.lower().endswith(".onnx"), load=_load, options=_OPTIONS,
    threads="loader",
    adapters=("blackbox_vqa.adapters.onnx.runtime", "blackbox_vqa.adapters.hf.onnx"),
    no_gradients="an ONNX file with no exported PyTorch graph beside it (ONNX Runtime "
    "computes no gradients)")
