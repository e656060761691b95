"""TorchAdapter: a user's ``nn.Module`` behind the model protocol.

The module's ``forward(image, tokens)`` takes a float tensor ``[B, 3, H, W]`` (resized and
normalised as described by :class:`~blackbox_vqa.preprocess.Preprocessing`) and a
long tensor ``[B, T]`` of token ids, right-padded with ``0``, and returns answer logits
``[B, A]``. The adapter turns those into scores with a softmax, a sigmoid, or as they are
(``output="probs"`` for a module that already returns probabilities).
"""

from __future__ import annotations

import copy
import ctypes
import platform
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.base import OUTPUT_KINDS, BaseAdapter, ImageArray, OutputKind
from blackbox_vqa.adapters.gradients import InputGradients, answer_index
from blackbox_vqa.adapters.incremental import (
    ApproximateScoring,
    IncrementalScores,
    IncrementalScoring,
)
from blackbox_vqa.adapters.questions import QuestionTokens, pad_tokens
from blackbox_vqa.adapters.torch.forward import eval_mode, gradient_mode, scores_from_logits
from blackbox_vqa.adapters.torch.hooks import embedding_offsets, find_embedding, guided_relu
from blackbox_vqa.adapters.torch.incremental.scoring import TorchIncremental
from blackbox_vqa.adapters.torch.path_gradients import (
    GradientInputs,
    PathGradients,
    check_points,
    embedding_replaced,
    score_gradients,
)
from blackbox_vqa.adapters.torch.preprocessing import to_tensor
from blackbox_vqa.adapters.torch.randomisation import parameter_layers, randomised_module
from blackbox_vqa.errors import (
    BlackboxVQAError,
    InputError,
    ModelError,
    ModelOutputError,
)
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from blackbox_vqa.text import PAD_ID

__all__ = ["OUTPUT_KINDS", "TorchAdapter", "pad_tokens", "scores_from_logits"]

Tokenizer = Callable[[str], Sequence[int]]



_allocator_settled = False
# Just under glibc's ceiling for its dynamic mmap threshold (32 MiB on 64-bit systems).
_SETTLE_BYTES = 30 * 2**20


def _settle_allocator() -> None:
    """Let glibc reuse freed activation memory instead of mapping fresh pages each batch.

    glibc serves a request at or above its *mmap threshold* with a new ``mmap`` and gives
    it back on ``free``; the threshold starts at 128 KiB and rises (to at most 32 MiB)
    only when a larger mmapped block is freed. Until then every CPU forward pass whose
    activations exceed it page-faults on each fresh page: in a new process the first
    reference-model explanations took 1.2-1.5x as long, with 20,000-45,000 faults each
    (benchmarks/BENCHMARKS.md, "Occlusion"). Freeing one 30 MiB block once moves the
    threshold where glibc would move it by itself after any such free; results are
    unchanged. Does nothing where the C library is not glibc.
    """
    global _allocator_settled
    if _allocator_settled:
        return
    _allocator_settled = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(_SETTLE_BYTES))
    except (OSError, AttributeError):
        return


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchAdapter(BaseAdapter, IncrementalScoring, ApproximateScoring):
    """Wrap ``module`` (``forward(image [B,3,H,W], tokens [B,T]) -> logits [B,A]``).

    Args:
        module: the PyTorch model. It is moved to ``device``; its training flags are
            restored after every call.
        answers: answer vocabulary, index-aligned with the logits.
        tokenizer: ``tokenizer(question) -> list[int]``; ``0`` is reserved for padding. If
            it has an ``unknown_words(question)`` method, questions made only of unknown
            words are refused.
        image_size: ``(H, W)`` the module expects (or one int for square images).
        mean: per-channel normalisation mean on the 0-1 scale.
        std: per-channel normalisation standard deviation on the 0-1 scale.
        output: ``"softmax"``, ``"sigmoid"`` or ``"probs"`` (logits already probabilities).
        device: torch device; default CUDA when available, else CPU.
        name: display name.
        incremental: ``"exact"`` (default) scores occlusion perturbations incrementally
            where the module's graph allows (see :meth:`incremental_scores`); ``"off"``
            always runs the plain forward pass.
    """

    def __init__(
        self,
        module: nn.Module,
        answers: Sequence[str],
        tokenizer: Tokenizer,
        *,
        image_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        output: OutputKind = "softmax",
        device: str | torch.device | None = None,
        name: str | None = None,
        incremental: str = "exact",
    ) -> None:
        super().__init__(answers, name=name)
        if not isinstance(module, nn.Module):
            raise InputError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(tokenizer):
            raise InputError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
        if output not in OUTPUT_KINDS:
            raise InputError(f"output must be one of {', '.join(OUTPUT_KINDS)}; got {output!r}")
        self.preprocessing = Preprocessing.create(image_size, mean, std)
        self.output: OutputKind = output
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else _default_device()
        self.module = module.to(self.device)
        self._questions = QuestionTokens(self.tokenizer)
        self.incremental = TorchIncremental(incremental)
        if self.device.type == "cpu":
            _settle_allocator()

    def validate_question(self, question: str) -> str:
        """Refuse empty questions and questions whose words are all unknown to the model."""
        return self._questions.validate(question)

    def tokens(self, question: str) -> list[int]:
        """Token ids of ``question`` (cached)."""
        return self._questions.tokens(question)

    def inputs(
        self, images: Sequence[ImageArray], questions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's input tensors for RGB arrays and questions, on the adapter's device."""
        image_tensor = to_tensor(self.preprocessing, images, self.device)
        tokens = pad_tokens([self.tokens(q) for q in questions])
        return image_tensor, torch.from_numpy(tokens).to(self.device)

    def logits(self, image_tensor: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Run the module and check its output has shape ``[B, A]``."""
        try:
            out = self.module(image_tensor, tokens)
        except Exception as exc:
            raise ModelError(f"{self.name}: forward pass failed: {type(exc).__name__}: {exc}") \
                from exc
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(
                f"{self.name}: forward returned {type(out).__name__}, expected a tensor [B, A]"
            )
        expected = (image_tensor.shape[0], len(self.answers))
        if tuple(out.shape) != expected:
            raise ModelOutputError(
                f"{self.name}: forward returned shape {tuple(out.shape)}, expected {expected}"
            )
        return out

    def _predict_batch(
        self, images: list[ImageArray], questions: list[str]
    ) -> NDArray[np.floating[Any]]:
        image_tensor, tokens = self.inputs(images, questions)
        with eval_mode(self.module), torch.inference_mode():
            scores = scores_from_logits(self.logits(image_tensor, tokens), self.output)
        return scores.double().cpu().numpy()

    # -- weight randomisation capability ------------------------------------------------

    def randomisable_layers(self) -> list[str]:
        """The module's layers with parameters of their own, output first (reverse
        registration order); see :mod:`blackbox_vqa.adapters.torch.randomisation`."""
        return parameter_layers(self.module)

    def randomised_copy(self, layers: int, seed: int) -> TorchAdapter:
        """An adapter over a deep copy of the module with its first ``layers``
        :meth:`randomisable_layers` re-initialised from ``seed``; this adapter and its
        module are left unchanged."""
        clone = copy.copy(self)
        clone.module = randomised_module(self.module, layers, seed)
        # The incremental engine traced this module: the copy gets its own.
        clone.incremental = TorchIncremental(self.incremental.mode,
                                             threshold=self.incremental.threshold)
        return clone
    # -- incremental scoring capability ------------------------------------------------

    def incremental_scores(
        self,
        image: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
    ) -> IncrementalScores:
        """Scores of perturbations of ``(image, question)``, as ``answer_probs_batch``
        gives them, computed incrementally (exact Krypton-style inference over the traced
        module, question branch once for image perturbations, image branch once for word
        perturbations); the plain path runs, with the reason in ``note``, when the module
        cannot be traced, carries hooks, fails the self-check, or ``incremental="off"``."""
        return self.incremental.scores(self, image, question, images, questions)

    def approximate_scores(
        self,
        image: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
        *,
        tau: float,
    ) -> IncrementalScores:
        """:meth:`incremental_scores` with Krypton's projective-field thresholding: each
        changed region is capped at ``tau`` of each feature map's side (approximate image
        perturbation scores, ``mode="approx"``); word perturbations stay exact."""
        return self.incremental.scores(self, image, question, images, questions, tau=tau)

    # -- gradient protocol -------------------------------------------------------------

    def input_gradients(
        self,
        image: ImageInput,
        question: str,
        *,
        answer: str | int | None = None,
        guided: bool = False,
    ) -> InputGradients:
        """Gradients of the score of ``answer`` (default: the predicted one) for one input.

        The score is the adapter's output (softmax probability, sigmoid, or the module's
        output for ``"probs"``). Gradients are taken with respect to the preprocessed
        image tensor ``[3, H, W]`` and each token's embedding vector (output of the
        module's only ``nn.Embedding``); with ``guided=True`` every ReLU is guided. The
        module's parameters, hooks, training flags and ``.grad`` fields are left as they
        were, also when the forward or backward pass raises.
        """
        question = self.validate_question(question)
        pixels = to_rgb_array(image)
        image_tensor, tokens = self.inputs([pixels], [question])
        return self.tensor_gradients(image_tensor, tokens, answer=answer, guided=guided)

    def tensor_gradients(
        self,
        image_tensor: torch.Tensor,
        tokens: torch.Tensor,
        *,
        answer: str | int | None = None,
        guided: bool = False,
    ) -> InputGradients:
        """:meth:`input_gradients` on ready module inputs ``[1, 3, H, W]`` and ``[1, T]``."""
        if image_tensor.shape[0] != 1 or tokens.shape[0] != 1:
            raise InputError(
                "gradients are taken for one input at a time, got a batch of "
                f"{image_tensor.shape[0]}"
            )
        leaf = image_tensor.detach().clone().requires_grad_(True)
        offsets, note = self._word_offsets(tokens)
        wrt = [leaf] if offsets is None else [leaf, offsets]
        with gradient_mode(self.module):
            logits = self._logits_with_offsets(leaf, tokens, offsets)
            scores = scores_from_logits(logits, self.output)[0]
            values = scores.detach().double().cpu().numpy()
            if not np.isfinite(values).all():
                raise ModelOutputError(f"{self.name} returned NaN or infinite scores")
            predicted = int(np.argmax(values))
            index = answer_index(self.answers, answer, predicted)
            grads, relus = self._backward(scores[index], wrt, guided)
        words = None if offsets is None else _numpy32(grads[1])[0]
        return InputGradients(
            image=_numpy32(grads[0])[0],
            words=words,
            token_ids=tuple(int(t) for t in tokens[0].tolist()),
            answer_index=index,
            predicted_index=predicted,
            scores=values,
            guided=guided,
            words_note=note,
            relus_guided=relus,
        )

    # -- path-gradient protocol (integrated gradients) -----------------------------------

    def gradient_inputs(self, image: ImageInput, question: str) -> GradientInputs:
        """The preprocessed image, the token embeddings (output of the module's only
        ``nn.Embedding``; one token per position, each its own "word"), the padding
        token's embedding and the scores; see :mod:`~blackbox_vqa.adapters.torch.path_gradients`.
        """
        question = self.validate_question(question)
        image_tensor, tokens = self.inputs([to_rgb_array(image)], [question])
        embedding, note = find_embedding(self.module)
        with eval_mode(self.module), torch.inference_mode():
            scores = scores_from_logits(self.logits(image_tensor, tokens), self.output)[0]
            if embedding is None:
                vectors = torch.zeros((tokens.shape[1], 0))
                pad = torch.zeros(0)
            else:
                vectors = embedding(tokens)[0]
                pad = embedding(torch.tensor([PAD_ID], device=self.device))[0]
        return GradientInputs(
            question=question,
            image=_numpy32(image_tensor[0]),
            embeddings=_numpy32(vectors),
            pad_embedding=_numpy32(pad),
            word_positions=tuple((i,) for i in range(tokens.shape[1])),
            token_ids=tuple(int(t) for t in tokens[0].tolist()),
            scores=scores.double().cpu().numpy(),
            words_note=note,
        )

    def path_gradients(
        self,
        inputs: GradientInputs,
        images: NDArray[np.float32],
        embeddings: NDArray[np.float32],
        answer_index: int,
    ) -> PathGradients:
        """Score of ``answer_index`` and its gradients at ``N`` points ``images
        [N, 3, H, W]``, ``embeddings [N, T, D]`` (the embedding output is replaced)."""
        check_points(inputs, images, embeddings)
        count = images.shape[0]
        tokens = torch.tensor(inputs.token_ids, dtype=torch.long, device=self.device)
        tokens = tokens[None].expand(count, -1)
        embedding = find_embedding(self.module)[0] if embeddings.shape[-1] else None

        def score_fn(image_leaf: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
            with embedding_replaced(embedding, words):
                logits = self.logits(image_leaf, tokens)
            return scores_from_logits(logits, self.output)[:, answer_index]

        words_in = None if embedding is None else torch.from_numpy(embeddings).to(self.device)
        with gradient_mode(self.module):
            scores, image_grad, word_grad = score_gradients(
                score_fn, torch.from_numpy(images).to(self.device), words_in, name=self.name
            )
        return PathGradients(
            scores=scores,
            image=image_grad,
            embeddings=np.zeros_like(embeddings) if word_grad is None else word_grad,
        )

    def _word_offsets(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """A zero leaf ``[B, T, D]`` added at the embedding output, or ``None`` and why."""
        embedding, note = find_embedding(self.module)
        if embedding is None:
            return None, note
        shape = (*tokens.shape, embedding.embedding_dim)
        zeros = torch.zeros(shape, dtype=embedding.weight.dtype, device=self.device)
        return zeros.requires_grad_(True), ""

    def _logits_with_offsets(
        self, image_tensor: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor | None
    ) -> torch.Tensor:
        """Module logits with ``offsets`` added to the embedding output (if given)."""
        if offsets is None:
            return self.logits(image_tensor, tokens)
        embedding, _ = find_embedding(self.module)
        if embedding is None:
            raise ModelError(f"{self.name}: the model's nn.Embedding disappeared")
        with embedding_offsets(embedding, offsets):
            return self.logits(image_tensor, tokens)

    def _backward(
        self, score: torch.Tensor, wrt: list[torch.Tensor], guided: bool
    ) -> tuple[list[torch.Tensor], int | None]:
        """``d score / d wrt`` (zeros where unused), every ReLU guided when ``guided``, and
        the number of ReLU backwards guided (``None`` for plain gradients)."""
        try:
            with guided_relu(guided) as mode:
                grads = torch.autograd.grad(score, wrt, allow_unused=True)
        except BlackboxVQAError:
            raise
        except Exception as exc:
            raise ModelError(
                f"{self.name}: backward pass failed: {type(exc).__name__}: {exc}"
            ) from exc
        filled = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt, strict=True)]
        return filled, None if mode is None else mode.calls


def _numpy32(tensor: torch.Tensor) -> NDArray[np.float32]:
    return tensor.detach().float().cpu().numpy()
