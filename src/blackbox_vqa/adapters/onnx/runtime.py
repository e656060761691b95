"""OnnxAdapter: an ONNX file behind the model protocol, run by ONNX Runtime.

Files written by ``bbvqa export`` carry their answers, tokenizer and preprocessing in
``metadata_props``; for third-party files the caller supplies them (options override the
metadata). The image and token inputs and the output are found by their types when that
is unambiguous (one rank-4 float input, one rank-2 integer input, one output), else named
by the caller. Images go through the same
:class:`~blackbox_vqa.preprocess.Preprocessing` code as
:class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`, so both see bit-identical tensors.

Sessions use the CUDA execution provider when ``onnxruntime-gpu`` and a GPU are present,
else the CPU; a session is built once per file, provider list and thread count, and
shared by every adapter in the process.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import OUTPUT_KINDS, BaseAdapter, ImageArray
from blackbox_vqa.adapters.questions import QuestionTokens, pad_tokens
from blackbox_vqa.adapters.vocab_files import read_json_vocab, tokenizer_from_words
from blackbox_vqa.errors import InputError, ModelError, ModelLoadError
from blackbox_vqa.metadata import ExportMetadata
from blackbox_vqa.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from blackbox_vqa.text import WordTokenizer

__all__ = [
    "OnnxAdapter",
    "TensorNames",
    "choose_names",
    "default_providers",
    "drop_sessions",
    "onnx_session",
    "read_answers",
    "read_vocab",
]

Tokenizer = Callable[[str], Sequence[int]]

_SESSIONS: dict[tuple[Any, ...], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def default_providers() -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when the CUDA provider is
    installed (``onnxruntime-gpu``), else ``["CPUExecutionProvider"]``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> Any:
    """The ONNX Runtime session for ``path`` (built once per file, providers and threads).

    ``threads`` sets the intra-op thread count (``None``: ONNX Runtime's default, one per
    physical core). Raises :class:`InputError` for a missing file and
    :class:`ModelLoadError` for one ONNX Runtime cannot load.
    """
    import onnxruntime as ort

    file = Path(path)
    if not file.is_file():
        raise InputError(f"ONNX file not found: {file}")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    chosen = tuple(providers) if providers else tuple(default_providers())
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, threads, chosen)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.inter_op_num_threads = 1
            if threads is not None:
                options.intra_op_num_threads = threads
            options.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(file), options, providers=list(chosen))
            except Exception as exc:
                raise ModelLoadError(f"ONNX Runtime cannot load {file}: {_first_line(exc)}") \
                    from exc
            _SESSIONS[key] = session
    return session


def drop_sessions(folder: str | os.PathLike[str]) -> None:
    """Forget the cached sessions of files under ``folder`` (e.g. a deleted staging folder)."""
    root = str(Path(folder).resolve())
    with _SESSIONS_LOCK:
        for key in [k for k in _SESSIONS if str(k[0]).startswith(root + os.sep)]:
            del _SESSIONS[key]


@dataclass(frozen=True)
class TensorNames:
    """Names of the image input, the token input and the score output of an ONNX graph."""

    image: str
    tokens: str
    output: str


def _rank(arg: Any) -> int | None:
    shape = getattr(arg, "shape", None)
    return len(shape) if isinstance(shape, (list, tuple)) else None


def choose_names(
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    *,
    image: str | None = None,
    tokens: str | None = None,
    output: str | None = None,
    source: str = "ONNX file",
) -> TensorNames:
    """Pick the tensors: given names are checked, missing ones found by type and rank."""
    in_names = [i.name for i in inputs]
    out_names = [o.name for o in outputs]
    for given, names, what, option in (
        (image, in_names, "input", "--image-input"),
        (tokens, in_names, "input", "--tokens-input"),
        (output, out_names, "output", "--output-name"),
    ):
        if given is not None and given not in names:
            raise InputError(
                f"{option} {given!r} is not an {what} of {source} ({what}s: {', '.join(names)})"
            )
    if image is None:
        image = _only(
            [i.name for i in inputs if "float" in i.type and _rank(i) == 4 and i.name != tokens],
            "image input (rank-4 float)", "--image-input", in_names, source,
        )
    if tokens is None:
        tokens = _only(
            [i.name for i in inputs if "int" in i.type and _rank(i) == 2 and i.name != image],
            "token input (rank-2 integer)", "--tokens-input", in_names, source,
        )
    extra = [n for n in in_names if n not in (image, tokens)]
    if extra:
        raise InputError(
            f"{source} has inputs besides the image and the tokens ({', '.join(extra)}); "
            "only two-input models are supported"
        )
    if output is None:
        output = _only(out_names, "output", "--output-name", out_names, source)
    return TensorNames(image=image, tokens=tokens, output=output)


def _only(candidates: list[str], what: str, option: str, names: list[str], source: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    found = "none" if not candidates else "several"
    raise InputError(
        f"cannot tell the {what} of {source} ({found} fit among {', '.join(names)}); "
        f"name it with {option}"
    )


class OnnxAdapter(BaseAdapter):
    """Run an ONNX VQA model with ONNX Runtime.

    The graph takes a ``float32 [B, 3, H, W]`` normalised image tensor and an integer
    ``[B, T]`` token tensor (right-padded with ``0``) and returns ``[B, A]`` logits (or
    scores; see ``output``).

    Args:
        path: the ``.onnx`` file.
        answers: answer vocabulary (default: from the file's metadata).
        tokenizer: ``tokenizer(question) -> list[int]`` (default: from the metadata).
        image_size: model input size (default: the metadata; without metadata the graph's
            static input size).
        mean: normalisation mean on the 0-1 scale (default: the metadata, else ImageNet's).
        std: normalisation std on the 0-1 scale (default: the metadata, else ImageNet's).
        output: ``"softmax"``, ``"sigmoid"`` or ``"probs"`` (default: metadata, else
            ``"softmax"``).
        image_input: name of the image input tensor (default: chosen by type).
        tokens_input: name of the token input tensor (default: chosen by type).
        output_name: name of the score output (default: the only one).
        threads: intra-op threads (default: ONNX Runtime's).
        providers: execution providers (default: :func:`default_providers`).
        name: display name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        answers: Sequence[str] | None = None,
        tokenizer: Tokenizer | None = None,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output: str | None = None,
        image_input: str | None = None,
        tokens_input: str | None = None,
        output_name: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path, threads=threads, providers=providers)
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        meta = (
            ExportMetadata.from_props(props, source=str(self.path))
            if ExportMetadata.present(props) else None
        )
        self.metadata = meta
        super().__init__(self._answers_from(answers, meta), name=name or self._name(meta))
        self.tokenizer = self._tokenizer_from(tokenizer, meta)
        self.names = self._names(meta, image_input, tokens_input, output_name)
        self.preprocessing = self._preprocessing(meta, image_size, mean, std)
        self.output = output or (meta.output if meta else "softmax")
        if self.output not in OUTPUT_KINDS:
            raise InputError(
                f"output must be one of {', '.join(OUTPUT_KINDS)}; got {self.output!r}"
            )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._token_dtype = np.int32 if "int32" in inputs[self.names.tokens].type else np.int64
        self._image_dtype = (
            np.float16 if "float16" in inputs[self.names.image].type else np.float32
        )
        self._questions = QuestionTokens(self.tokenizer)

    @classmethod
    def from_options(cls, path: str, extra: Mapping[str, Any]) -> OnnxAdapter:
        """Build from command-line options (``ModelOptions.extra``); unset ones are ``None``.

        Keys: ``answers_file``, ``vocab_file``, ``image_size`` (``(H, W)`` or ``"HxW"``),
        ``mean``, ``std`` (three numbers or ``"r,g,b"``), ``output``, ``image_input``,
        ``tokens_input``, ``output_name``, ``threads``.
        """
        answers_file = extra.get("answers_file")
        vocab_file = extra.get("vocab_file")
        size = extra.get("image_size")
        return cls(
            path,
            answers=read_answers(answers_file) if answers_file else None,
            tokenizer=read_vocab(vocab_file) if vocab_file else None,
            image_size=_size_option(size) if size else None,
            mean=_triple_option(extra.get("mean"), "--mean"),
            std=_triple_option(extra.get("std"), "--std"),
            output=extra.get("output") or None,
            image_input=extra.get("image_input") or None,
            tokens_input=extra.get("tokens_input") or None,
            output_name=extra.get("output_name") or None,
            threads=extra.get("threads") or None,
        )

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses."""
        return list(self.session.get_providers())

    def _name(self, meta: ExportMetadata | None) -> str:
        if meta is not None and meta.source_model:
            return f"{meta.source_model} (onnx)"
        return self.path.name

    def _answers_from(
        self, answers: Sequence[str] | None, meta: ExportMetadata | None
    ) -> Sequence[str]:
        if answers is not None:
            return answers
        if meta is None:
            raise InputError(
                f"{self.path} has no blackbox_vqa metadata; give its answers with "
                "--answers FILE (one answer per line, in output order)"
            )
        return meta.answers

    def _tokenizer_from(self, tokenizer: Tokenizer | None, meta: ExportMetadata | None) \
            -> Tokenizer:
        if tokenizer is not None:
            if not callable(tokenizer):
                raise InputError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
            return tokenizer
        if meta is None:
            raise InputError(
                f"{self.path} has no blackbox_vqa metadata; give its vocabulary with "
                "--vocab FILE (JSON word -> id map, or one word per line)"
            )
        return meta.word_tokenizer()

    def _names(
        self,
        meta: ExportMetadata | None,
        image: str | None,
        tokens: str | None,
        output: str | None,
    ) -> TensorNames:
        known: Mapping[str, str] = meta.inputs if meta else {}
        return choose_names(
            self.session.get_inputs(),
            self.session.get_outputs(),
            image=image or known.get("image"),
            tokens=tokens or known.get("tokens"),
            output=output or known.get("output"),
            source=str(self.path),
        )

    def _preprocessing(
        self,
        meta: ExportMetadata | None,
        image_size: int | Sequence[int] | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> Preprocessing:
        base = meta.preprocessing if meta else None
        size = image_size or (base.image_size if base else self._static_size())
        return Preprocessing.create(
            size,
            mean or (base.mean if base else IMAGENET_MEAN),
            std or (base.std if base else IMAGENET_STD),
        )

    def _static_size(self) -> tuple[int, int]:
        arg = next(i for i in self.session.get_inputs() if i.name == self.names.image)
        height, width = arg.shape[2], arg.shape[3]
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
            return height, width
        raise InputError(
            f"{self.path} has no blackbox_vqa metadata and a dynamic image size; give it "
            "with --image-size N or HxW"
        )

    def validate_question(self, question: str) -> str:
        """Refuse empty questions and questions whose words are all unknown to the model."""
        return self._questions.validate(question)

    def tokens(self, question: str) -> list[int]:
        """Token ids of ``question`` (cached)."""
        return self._questions.tokens(question)

    def feeds(self, images: Sequence[ImageArray], questions: Sequence[str]) \
            -> dict[str, NDArray[Any]]:
        """The session's input arrays for RGB arrays and questions."""
        image = self.preprocessing.array(images)
        tokens = pad_tokens([self.tokens(q) for q in questions])
        return {
            self.names.image: image.astype(self._image_dtype, copy=False),
            self.names.tokens: tokens.astype(self._token_dtype, copy=False),
        }

    def logits(self, feeds: Mapping[str, NDArray[Any]]) -> NDArray[np.float32]:
        """Run the session; ONNX Runtime errors become :class:`ModelError`."""
        try:
            (out,) = self.session.run([self.names.output], dict(feeds))
        except Exception as exc:
            raise ModelError(f"{self.name}: ONNX Runtime failed: {_first_line(exc)}") from exc
        return np.asarray(out)

    def _predict_batch(
        self, images: list[ImageArray], questions: list[str]
    ) -> NDArray[np.floating[Any]]:
        logits = self.logits(self.feeds(images, questions)).astype(np.float64)
        if logits.ndim != 2 or logits.shape[0] != len(images):
            return logits  # check_scores reports the shape
        return _scores(logits, self.output)


def read_answers(path: str | os.PathLike[str]) -> list[str]:
    """Answers from a file: a JSON list, or one answer per line (blank lines skipped)."""
    text = _read_text(path, "--answers")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"--answers file {path} is not valid JSON: {exc}") from exc
        answers = [str(a) for a in data]
    else:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise InputError(f"--answers file {path} holds no answers")
    return answers


def read_vocab(path: str | os.PathLike[str]) -> WordTokenizer:
    """A tokenizer from a file: a JSON ``{word: id}`` map, a ``WordTokenizer.to_dict()``
    JSON, a word-level Hugging Face ``tokenizer.json``, or one word per line (line ``i``,
    from 0, gets id ``i + 2``; 0 pads, 1 is unknown). Files holding another tokenizer's
    special tokens (``[PAD]``, ``[UNK]``...) are refused (see ``vocab_files``)."""
    text = _read_text(path, "--vocab")
    try:
        if text.lstrip().startswith("{"):
            return read_json_vocab(text, path)
        words = [line.strip() for line in text.splitlines() if line.strip()]
        return tokenizer_from_words(words, path)
    except InputError:
        raise
    except (ValueError, TypeError) as exc:
        raise InputError(f"--vocab file {path} is not usable: {exc}") from exc


def _read_text(path: str | os.PathLike[str], option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{option} file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {option} file {path}: {exc}") from exc


def _size_option(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        from blackbox_vqa.sizes import parse_size

        parsed = parse_size(value, "--image-size")
        if parsed is None:
            raise InputError("--image-size is empty")
        return parsed
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _triple_option(value: Any, option: str) -> tuple[float, float, float] | None:
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        triple = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise InputError(f"{option} must be three numbers 'r,g,b' (0-1 scale), got {value!r}")
    return triple  # type: ignore[return-value]


def _scores(logits: NDArray[np.float64], output: str) -> NDArray[np.float64]:
    """Softmax, sigmoid or identity, in ``float64``."""
    if output == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
    if output == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))  # type: ignore[no-any-return]
    return logits


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
