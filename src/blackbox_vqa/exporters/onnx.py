"""Export a PyTorch VQA model: ``model.onnx`` plus its PyTorch graph, verified.

``export_model`` writes, into a temporary folder inside the output folder:

- ``model.onnx``: dynamic batch and question length, opset 20 by default, checked by
  ``onnx.checker``, the metadata in ``metadata_props``. Exporter ``auto``: the
  TorchScript-based one for models with an ``nn.LSTM``/``GRU``/``RNN`` (with torch 2.13 the
  ``torch.export``-based one relies on ``torch.export``, which specialises recurrent layers
  on the sequence length, and only its first use in a process happens to succeed), the
  ``torch.export``-based one (``dynamo``) for the others, falling back to the
  TorchScript-based one when it fails.
- the PyTorch graph (``model.pt2`` or ``model.torchscript``, see
  :mod:`blackbox_vqa.exporters.graph`) with the same metadata as extra files.

Then it verifies the files: the answer probabilities of ONNX Runtime and of the graph
against the PyTorch model on a batch of real inputs (several batch sizes and question
lengths), and the graph's guided image gradient against the model's. Only when every
difference is within tolerance are the files renamed into the output folder; otherwise
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.base import ImageArray, model_name
from blackbox_vqa.adapters.capabilities import SupportsOwnAnswer
from blackbox_vqa.adapters.onnx.runtime import drop_sessions
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.adapters.torch.hooks import find_embedding
from blackbox_vqa.adapters.torch.module import TorchAdapter
from blackbox_vqa.errors import BlackboxVQAError, InputError, ModelError, NotSupportedError
from blackbox_vqa.exporters.graph import GraphFormat, GraphInputs, graph_suffix, save_graph
from blackbox_vqa.images import load_image, to_rgb_array
from blackbox_vqa.metadata import ExportMetadata
from blackbox_vqa.outputs import prepare_output_dir

__all__ = [
    "DEFAULT_OPSET",
    "ExportResult",
    "default_samples",
    "export_model",
    "exporter_reason",
]

DEFAULT_OPSET = 20
ONNX_FILE = "model.onnx"
GRAPH_STEM = "model"
ONNX_NAMES = {"image": "images", "tokens": "tokens", "output": "logits"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote and measured.

    Attributes:
        onnx_path, graph_path: the files written.
        graph_format: ``"pt2"`` or ``"torchscript"``; ``graph_note`` says why when
            ``torch.export`` was tried and not used.
        onnx_exporter: ``"dynamo"`` (torch.export-based) or ``"torchscript"``.
        opset: the ONNX opset.
        onnx_bytes, graph_bytes: file sizes.
        onnx_seconds, graph_seconds, verify_seconds: wall-clock times.
        onnx_max_diff, graph_max_diff: max absolute difference of the answer
            probabilities against the PyTorch model over ``samples`` inputs.
        gradient_rel_diff: max abs difference of the graph's guided image gradient
            relative to the model's largest gradient value.
    """

    onnx_path: Path
    graph_path: Path
    graph_format: str
    graph_note: str
    onnx_exporter: str
    opset: int
    onnx_bytes: int
    graph_bytes: int
    onnx_seconds: float
    graph_seconds: float
    verify_seconds: float
    onnx_max_diff: float
    graph_max_diff: float
    gradient_rel_diff: float
    samples: int


class _Logits(nn.Module):
    """``forward(images, tokens)`` of the user's module, under fixed argument names."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.model = module

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(images, tokens)  # type: ignore[no-any-return]


def exporter_reason(exc: BaseException) -> str:
    """One line saying why an exporter failed (its summary line when it has one)."""
    text = _ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    line = re.sub(r"^<class '[\w.]+'>:\s*", "", line)
    return line if len(line) <= 300 else line[:297] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log lines for the block."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Swallow what native code writes to file descriptors 1 and 2 during the block.

    The TorchScript-based exporter turns its C++ log on (and leaves it on) and dumps the
    whole IR graph when it fails; the user gets the one-line reason instead.
    """
    enabled = torch._C._jit_is_onnx_log_enabled()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        torch._C._jit_set_onnx_log_enabled(enabled)


def default_samples(adapter: TorchAdapter, n: int = 8) -> list[tuple[ImageArray, str]]:
    """Real verification inputs: easy-VQA test images and the questions the model accepts.

    Questions are easy-VQA test questions the model's tokenizer knows, of varied lengths;
    when too few are known, questions made of the tokenizer's vocabulary are added.
    """
    from easy_vqa import get_test_image_paths, get_test_questions

    paths = get_test_image_paths()
    images: list[ImageArray] = [load_image(paths[k]) for k in sorted(paths)[:n]]
    questions = _known_questions(adapter, list(get_test_questions()[0])[:500], n)
    questions += _vocabulary_questions(adapter, n - len(questions))
    if not questions:
        raise InputError(
            "cannot build verification questions for this model; give some with --question"
        )
    return [(images[i % len(images)], questions[i % len(questions)]) for i in range(n)]


def _known_questions(adapter: TorchAdapter, candidates: list[str], n: int) -> list[str]:
    by_length: dict[int, str] = {}
    for question in candidates:
        try:
            length = len(adapter.tokens(adapter.validate_question(question)))
        except BlackboxVQAError:
            continue
        by_length.setdefault(length, question)
    chosen = [by_length[k] for k in sorted(by_length)]
    return chosen[:n]


def _vocabulary_questions(adapter: TorchAdapter, n: int) -> list[str]:
    vocab = getattr(adapter.tokenizer, "vocab", None)
    if n <= 0 or not vocab:
        return []
    words = sorted(vocab, key=lambda w: vocab[w])
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = 1 + (3 * i) % 11
        out.append(" ".join(str(words[j]) for j in rng.integers(0, len(words), length)))
    return out


def export_model(
    adapter: object,
    out_dir: str | os.PathLike[str],
    *,
    graph: str = "auto",
    onnx_exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-4,
    samples: Sequence[tuple[Any, str]] | None = None,
    force: bool = False,
    log: Log | None = None,
) -> ExportResult:
    """Export ``adapter`` (a :class:`TorchAdapter`) to ``out_dir``; see the module docstring.

    Raises :class:`NotSupportedError` (one line, the exporter's reason) for a model that
    cannot be exported and :class:`ModelError` when verification finds a difference above
    ``tolerance``; in both cases nothing is written.
    """
    torch_adapter = _check_exportable(adapter)
    if graph not in ("auto", "pt2", "torchscript"):
        raise InputError(f"graph format must be auto, pt2 or torchscript, got {graph!r}")
    if onnx_exporter not in ("auto", "dynamo", "torchscript"):
        raise InputError(
            f"ONNX exporter must be auto, dynamo or torchscript, got {onnx_exporter!r}"
        )
    if not 7 <= opset <= 23:
        raise InputError(f"opset must be between 7 and 23, got {opset}")
    if not tolerance > 0:
        raise InputError(f"tolerance must be > 0, got {tolerance}")
    say = log or (lambda message: None)
    pairs = _samples(torch_adapter, samples)
    created = not Path(out_dir).exists()
    folder = prepare_output_dir(out_dir, force=force, marker=ONNX_FILE)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        result = _export(torch_adapter, staging, folder, pairs,
                         (graph, onnx_exporter, opset, tolerance), say)
        for name in (ONNX_FILE, result.graph_path.name):
            os.replace(staging / name, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    finally:
        drop_sessions(staging)
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _check_exportable(adapter: object) -> TorchAdapter:
    if isinstance(adapter, SupportsOwnAnswer):
        raise NotSupportedError(
            f"{model_name(adapter)} is a generative model (it answers in free text), and "
            "export covers classifiers only (easyvqa, a TorchAdapter factory, a ViLT-style "
            "hf: folder); explain it as it is (its batches and caches are on PyTorch)"
        )
    if not isinstance(adapter, TorchAdapter):
        raise NotSupportedError(
            f"only PyTorch models can be exported; {model_name(adapter)} is a "
            f"{type(adapter).__name__}, not a TorchAdapter"
        )
    if not callable(getattr(adapter.tokenizer, "to_dict", None)):
        raise NotSupportedError(
            f"{model_name(adapter)}: its tokenizer ({type(adapter.tokenizer).__name__}) cannot "
            "be saved with the model; use blackbox_vqa.text.WordTokenizer"
        )
    return adapter


def _samples(
    adapter: TorchAdapter, samples: Sequence[tuple[Any, str]] | None
) -> list[tuple[ImageArray, str]]:
    pairs = default_samples(adapter) if not samples else [
        (to_rgb_array(image), question) for image, question in samples
    ]
    return [(image, adapter.validate_question(question)) for image, question in pairs]


def _metadata(adapter: TorchAdapter, graph_file: str, inputs: dict[str, str]) -> ExportMetadata:
    from blackbox_vqa.version import __version__

    embedding, _ = find_embedding(adapter.module)
    return ExportMetadata(
        answers=tuple(adapter.answers),
        tokenizer=adapter.tokenizer.to_dict(),  # type: ignore[attr-defined]
        preprocessing=adapter.preprocessing,
        output=adapter.output,
        source_model=model_name(adapter),
        inputs=inputs,
        word_embedding_dim=None if embedding is None else int(embedding.embedding_dim),
        graph_file=graph_file,
        version=__version__,
    )


def _export(
    adapter: TorchAdapter,
    staging: Path,
    folder: Path,
    pairs: list[tuple[ImageArray, str]],
    settings: tuple[str, str, int, float],
    say: Log,
) -> ExportResult:
    graph, onnx_exporter, opset, tolerance = settings
    example = _example(adapter, pairs)
    embedding, _ = find_embedding(adapter.module)
    graph_inputs = {**ONNX_NAMES, "word_offsets": "word_offsets"} if embedding else ONNX_NAMES
    started = time.perf_counter()
    with eval_mode(adapter.module), torch.no_grad():
        graph_path, fmt, note = _save_graph(adapter, embedding, example, staging, graph,
                                            graph_inputs)
    graph_seconds = time.perf_counter() - started
    say(f"graph: {graph_path.name} ({fmt}) in {graph_seconds:.1f} s")
    started = time.perf_counter()
    props = _metadata(adapter, graph_path.name, ONNX_NAMES).to_props()
    with eval_mode(adapter.module), torch.no_grad():
        exporter = _save_onnx(adapter.module, example, staging / ONNX_FILE, opset, props,
                              onnx_exporter)
    onnx_seconds = time.perf_counter() - started
    say(f"onnx: {ONNX_FILE} ({exporter} exporter, opset {opset}) in {onnx_seconds:.1f} s")
    started = time.perf_counter()
    onnx_diff, graph_diff, grad_diff = _verify(adapter, staging, graph_path, pairs)
    verify_seconds = time.perf_counter() - started
    say(f"verify: {len(pairs)} inputs, max |p_onnx - p_torch| = {onnx_diff:.3g}, "
        f"max |p_graph - p_torch| = {graph_diff:.3g}, guided gradient rel. diff = {grad_diff:.3g}")
    if max(onnx_diff, graph_diff) > tolerance:
        raise ModelError(
            f"export verification failed: max |p_onnx - p_torch| = {onnx_diff:.3g}, "
            f"max |p_graph - p_torch| = {graph_diff:.3g} > tolerance {tolerance:g}; nothing "
            "was written"
        )
    if grad_diff > 1e-3:
        raise ModelError(
            f"export verification failed: the graph's guided gradient differs from the "
            f"model's by {grad_diff:.3g} (relative); nothing was written"
        )
    return ExportResult(
        onnx_path=folder / ONNX_FILE,
        graph_path=folder / graph_path.name,
        graph_format=fmt,
        graph_note=note,
        onnx_exporter=exporter,
        opset=opset,
        onnx_bytes=(staging / ONNX_FILE).stat().st_size,
        graph_bytes=graph_path.stat().st_size,
        onnx_seconds=onnx_seconds,
        graph_seconds=graph_seconds,
        verify_seconds=verify_seconds,
        onnx_max_diff=onnx_diff,
        graph_max_diff=graph_diff,
        gradient_rel_diff=grad_diff,
        samples=len(pairs),
    )


def _example(
    adapter: TorchAdapter, pairs: list[tuple[ImageArray, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Example inputs with batch 2 and at least 2 token columns (no size 1 to specialise)."""
    first = (pairs * 2)[:2]
    images, tokens = adapter.inputs([p[0] for p in first], [p[1] for p in first])
    if tokens.shape[1] < 2:
        tokens = torch.cat([tokens, torch.zeros_like(tokens)], dim=1)
    return images, tokens


def _save_graph(
    adapter: TorchAdapter,
    embedding: nn.Embedding | None,
    example: tuple[torch.Tensor, torch.Tensor],
    staging: Path,
    graph: str,
    inputs: dict[str, str],
) -> tuple[Path, GraphFormat, str]:
    args: list[torch.Tensor] = list(example)
    if embedding is not None:
        args.append(torch.zeros((*example[1].shape, embedding.embedding_dim),
                                device=example[0].device))
    formats: list[GraphFormat]
    if graph == "pt2":
        formats = ["pt2"]
    elif graph == "torchscript" or recurrent(adapter.module):
        formats = ["torchscript"]
    else:
        formats = ["pt2", "torchscript"]
    note = ""
    for fmt in formats:
        path = staging / f"{GRAPH_STEM}{graph_suffix(fmt)}"
        props = _metadata(adapter, path.name, inputs).to_props()
        try:
            with _quiet():
                copy = _private_copy(adapter.module)
                save_graph(GraphInputs(copy, find_embedding(copy)[0]), args, path, fmt, props)
            if fmt == "pt2" and graph == "auto":
                _check_dynamic(path, adapter, args)
            return path, fmt, note
        except BlackboxVQAError as exc:
            path.unlink(missing_ok=True)
            note = str(exc)
        except Exception as exc:
            path.unlink(missing_ok=True)
            what = "torch.export" if fmt == "pt2" else "torch.jit.trace"
            note = f"{what} failed: {exporter_reason(exc)}"
        if fmt == "pt2" and graph == "auto":
            note = f"{note}; saved a traced TorchScript graph instead"
    raise NotSupportedError(f"cannot export {model_name(adapter)} as a PyTorch graph: {note}")


def _check_dynamic(path: Path, adapter: TorchAdapter, args: list[torch.Tensor]) -> None:
    """Refuse a ``.pt2`` that does not accept another batch size and question length."""
    from blackbox_vqa.exporters.graph import load_graph

    module, _ = load_graph(path, args[0].device)
    longer = [
        torch.cat([args[0], args[0][:1]]),
        torch.cat([args[1], args[1][:, :1]], dim=1).repeat(2, 1)[:3],
    ]
    if len(args) == 3:
        longer.append(torch.zeros((3, longer[1].shape[1], args[2].shape[2])))
    try:
        module(*longer)
    except Exception as exc:
        raise NotSupportedError(
            "torch.export specialised the batch size or question length "
            f"({exporter_reason(exc)})"
        ) from exc


def _private_copy(module: nn.Module) -> nn.Module:
    """A deep copy for an exporter to work on: ``torch.export`` re-assigns module
    attributes (and a failed export changes how the next one behaves), so the user's
    module is never handed to it."""
    try:
        return copy.deepcopy(module).eval()
    except Exception as exc:
        raise NotSupportedError(
            f"cannot copy the model for export: {type(exc).__name__}: {exporter_reason(exc)}"
        ) from exc


def recurrent(module: nn.Module) -> bool:
    """Whether ``module`` holds an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def _save_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, torch.Tensor],
    path: Path,
    opset: int,
    props: dict[str, str],
    exporter: str,
) -> str:
    """Write ``path``; returns the exporter used (``"dynamo"`` or ``"torchscript"``)."""
    import onnx

    wrapper = _Logits(_private_copy(module))
    if exporter == "auto":
        exporter = "torchscript" if recurrent(module) else "dynamo"
        fallback = exporter == "dynamo" and opset <= 20
    else:
        fallback = False
    if exporter == "dynamo":
        try:
            proto = _dynamo_onnx(wrapper, example, opset)
        except Exception as first:
            if not fallback:
                raise NotSupportedError(f"cannot export to ONNX: {exporter_reason(first)}") \
                    from first
            exporter = "torchscript"
    if exporter == "torchscript":
        proto = _legacy_onnx(wrapper, example, opset, path)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.save_model(proto, str(path))
    except Exception as exc:
        raise NotSupportedError(f"the exported ONNX graph is invalid: {exporter_reason(exc)}") \
            from exc
    return exporter


def _dynamo_onnx(wrapper: nn.Module, example: tuple[torch.Tensor, torch.Tensor], opset: int) \
        -> Any:
    with _quiet():
        program = torch.onnx.export(
            wrapper, example, dynamo=True, opset_version=opset, verbose=False,
            input_names=["images", "tokens"], output_names=["logits"],
            dynamic_shapes=({0: "batch"}, {0: "batch", 1: "tokens"}),
        )
    if program is None:
        raise ModelError("torch.onnx.export returned no program")
    return program.model_proto


def _legacy_onnx(
    wrapper: nn.Module, example: tuple[torch.Tensor, torch.Tensor], opset: int, path: Path
) -> Any:
    import onnx

    if opset > 20:
        raise InputError(f"the TorchScript-based ONNX exporter supports opsets up to 20, "
                         f"got --opset {opset}")
    axes = {"images": {0: "batch"}, "tokens": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    try:
        with _quiet(), _native_output_silenced():
            torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=opset,
                              input_names=["images", "tokens"], output_names=["logits"],
                              dynamic_axes=axes)
        return onnx.load(str(path))
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise NotSupportedError(f"cannot export to ONNX: {exporter_reason(exc)}") from exc


def _chunks(pairs: list[tuple[ImageArray, str]], adapter: TorchAdapter) \
        -> list[list[tuple[ImageArray, str]]]:
    """Split by question length into batches of 1, 2 and the rest (varied B and T)."""
    ordered = sorted(pairs, key=lambda p: len(adapter.tokens(p[1])))
    sizes = [1, 2]
    out, start = [], 0
    for size in sizes:
        if start < len(ordered):
            out.append(ordered[start:start + size])
            start += size
    if start < len(ordered):
        out.append(ordered[start:])
    return out


def _verify(
    adapter: TorchAdapter, staging: Path, graph_path: Path, pairs: list[tuple[ImageArray, str]]
) -> tuple[float, float, float]:
    from blackbox_vqa.adapters.onnx.runtime import OnnxAdapter
    from blackbox_vqa.adapters.torch.graph import GraphAdapter

    onnx_model = OnnxAdapter(staging / ONNX_FILE)
    graph_model = GraphAdapter(graph_path, device=adapter.device)
    onnx_diff = graph_diff = 0.0
    try:
        for chunk in _chunks(pairs, adapter):
            images, questions = [p[0] for p in chunk], [p[1] for p in chunk]
            reference = adapter.answer_probs_batch(images, questions)
            onnx_diff = max(onnx_diff, _max_diff(onnx_model.answer_probs_batch(images, questions),
                                                 reference))
            graph_diff = max(graph_diff, _max_diff(
                graph_model.answer_probs_batch(images, questions), reference))
        image, question = pairs[0]
        ours = adapter.input_gradients(image, question, guided=True).image
        theirs = graph_model.input_gradients(image, question, guided=True).image
    except BlackboxVQAError as exc:
        raise ModelError(f"export verification failed: {exc}") from exc
    scale = float(np.abs(ours).max()) or 1.0
    return onnx_diff, graph_diff, float(np.abs(ours - theirs).max()) / scale


def _max_diff(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())
