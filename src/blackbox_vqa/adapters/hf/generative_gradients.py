"""Gradients of generative VLMs: the gradient and path-gradient protocols for
:class:`~blackbox_vqa.adapters.hf.generative.GenerativeAdapter` (a mixin).

The score differentiated is the log of the explained answer's score: for the answer
itself its teacher-forced log-likelihood ``sum_i log p(token_i | image, prompt,
tokens_<i)`` (the quantity the adapter scores, end-of-sequence included as there), for
``"(other)"`` ``log(1 - p)``. Inputs are the processor's ``pixel_values [3, H, W]`` and the
word-embedding vectors of the prompt's ``T`` tokens (``get_input_embeddings()`` output,
replaced by a forward hook; the answer's embeddings stay fixed). A question word's
gradient is the sum of its sub-word tokens' gradients.

Families whose processor gives one ``[1, 3, H, W]`` image tensor (LLaVA, PaliGemma) are
differentiated end to end. Others raise :class:`GradientUnavailableError` with the
reason (Qwen2-VL: flattened patches; Idefics3: tiled sub-images), so their gradient
methods are recorded as unavailable; so does candidate mode (``--answers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.gradients import InputGradients
from blackbox_vqa.adapters.gradients import answer_index as resolve_answer
from blackbox_vqa.adapters.hf.processing import word_positions
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.adapters.torch.hooks import embedding_output_hook, guided_relu
from blackbox_vqa.adapters.torch.path_gradients import (
    GradientInputs,
    PathGradients,
    check_points,
    score_gradients,
)
from blackbox_vqa.errors import BlackboxVQAError, GradientUnavailableError, ModelError
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = ["GenerativeGradients", "question_positions"]


def question_positions(
    tokenizer: Any, prompt: str, question_start: int, question: str, ids: Sequence[int]
) -> tuple[tuple[int, ...], ...] | None:
    """For each word of ``question`` (at ``question_start`` in ``prompt``), its positions in
    the processor's token ids ``ids`` (image placeholders expanded), or ``None`` when the
    question's tokens cannot be found there.

    The prompt is tokenized alone with character offsets; the run of tokens overlapping the
    question is looked up in ``ids`` (last occurrence), and positions shift by its place.
    """
    try:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return None
    own = [int(t) for t in encoded["input_ids"]]
    offsets = [(int(a) - question_start, int(b) - question_start)
               for a, b in encoded["offset_mapping"]]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < len(question) and b > 0]
    if not inside:
        return None
    first, last = inside[0], inside[-1] + 1
    run = own[first:last]
    found = [s for s in range(len(ids) - len(run) + 1) if list(ids[s:s + len(run)]) == run]
    if not found:
        return None
    shift = found[-1] - first
    words = word_positions(question, offsets[first:last])
    return tuple(tuple(first + p + shift for p in w) for w in words)


class GenerativeGradients:
    """Gradient and path-gradient protocols for a generative adapter (see module doc).

    Uses the host adapter's ``module``, ``processor``, ``tokenizer``, ``prompts``,
    ``encode``, ``answer_ids``, ``candidates``, ``softcap``, ``device`` and ``name``.
    """

    module: Any
    tokenizer: Any
    prompts: Any
    candidates: list[str]
    answer_ids: tuple[int, ...]
    softcap: Any
    pad_id: int
    _fixed: bool
    _prepared: tuple[str, str] | None
    device: torch.device
    name: str

    if TYPE_CHECKING:  # the host's methods, declared for type checkers only
        @property
        def answers(self) -> Sequence[str]:
            raise NotImplementedError

        def encode(self, images: Sequence[NDArray[np.uint8]], questions: Sequence[str]
                   ) -> dict[str, torch.Tensor]:
            raise NotImplementedError

        def validate_question(self, question: str) -> str:
            raise NotImplementedError

        def prepare(self, image: ImageInput, question: str) -> None:
            raise NotImplementedError

        def answer_probs_batch(self, images: Sequence[ImageInput], questions: Sequence[str]
                               ) -> NDArray[np.floating[Any]]:
            raise NotImplementedError

    # -- checks and inputs -----------------------------------------------------------------

    def gradients_unavailable(self, encoded: dict[str, torch.Tensor] | None = None
                              ) -> str | None:
        """Why this model's gradients are unavailable (``None``: they are available)."""
        if self.candidates:
            return (f"{self.name}: gradients are not implemented with candidate answers "
                    "(--answers); explain the model's own answer or one --answer")
        if encoded is None:
            return None
        pixels = encoded.get("pixel_values")
        extra = sorted(set(encoded) - {"input_ids", "attention_mask", "pixel_values",
                                       "token_type_ids"})
        if pixels is None or pixels.ndim != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
            shape = "none" if pixels is None else "x".join(map(str, pixels.shape))
            return (f"{self.name}: its processor gives pixel_values of shape {shape} "
                    f"({type(self.module).__name__}: patches or tiles, not one [1, 3, H, W] "
                    "image), so gradients cannot be shown as an image map")
        if extra:
            return (f"{self.name}: its processor also gives {', '.join(extra)}, which the "
                    "gradient pass does not handle")
        return None

    def _grad_encoded(self, image: ImageInput, question: str, *, own_answer: bool
                      ) -> tuple[str, dict[str, torch.Tensor]]:
        """``own_answer``: explain this input's own answer (``prepare``); else keep the
        answer already chosen (a path's baseline must not change the answer)."""
        reason = self.gradients_unavailable()
        if reason:
            raise GradientUnavailableError(reason)
        question = self.validate_question(question)
        pixels = to_rgb_array(image)
        if own_answer or (not self._fixed and self._prepared is None):
            self.prepare(pixels, question)
        encoded = self.encode([_levels(pixels)], [question])
        reason = self.gradients_unavailable(encoded)
        if reason:
            raise GradientUnavailableError(reason)
        self.__dict__.setdefault("_gradient_keys", {})[question] = set(encoded)
        return question, encoded

    def _embedding(self) -> nn.Module:
        embedding = self.module.get_input_embeddings()
        if not isinstance(embedding, nn.Module):
            raise ModelError(f"{self.name}: get_input_embeddings() returned no module")
        return embedding

    def _word_positions(self, question: str, ids: Sequence[int]
                        ) -> tuple[tuple[int, ...], ...] | None:
        prompt = self.prompts(question)
        text = self.prompts.text(question)
        at = prompt.rfind(text)
        start = -1 if at < 0 else at + text.find(question)
        if start < 0:
            return None
        return question_positions(self.tokenizer, prompt, start, question, ids)

    # -- the differentiable score ----------------------------------------------------------

    def log_scores(self, encoded: dict[str, torch.Tensor], images: torch.Tensor,
                   embeddings: torch.Tensor | None, answer_index: int) -> torch.Tensor:
        """``[N]``: log score of ``answers[answer_index]`` at ``N`` points ``images
        [N, 3, H, W]`` and prompt embeddings ``[N, T, D]`` (``None``: the model's own),
        differentiable; the prompt's tokens are ``encoded``'s (one input)."""
        ids = encoded["input_ids"]
        count, width = images.shape[0], ids.shape[1]
        answer = torch.tensor(list(self.answer_ids), dtype=ids.dtype, device=ids.device)
        size = answer.shape[0]
        full = torch.cat([ids, answer[None]], dim=1).expand(count, -1)
        mask = torch.ones_like(full)
        extra: dict[str, torch.Tensor] = {}
        if "token_type_ids" in encoded:  # PaliGemma: prefix 0 (bidirectional), answer 1
            extra["token_type_ids"] = torch.cat(
                [torch.zeros_like(ids), torch.ones_like(answer)[None]], dim=1).expand(count, -1)
        embedding = self._embedding()
        dim = 0 if embeddings is None else embeddings.shape[-1]

        context: Any = _nothing()
        if embeddings is not None and dim > 0:
            given = embeddings

            def replace(output: torch.Tensor) -> torch.Tensor:
                return torch.cat([given.to(output.dtype), output[:, width:]], dim=1)

            context = embedding_output_hook(embedding, (count, width + size, dim), replace,
                                            what="word embedding")
        with context:
            hidden = self.module.model(input_ids=full, attention_mask=mask,
                                       pixel_values=images.to(_dtype(self.module)),
                                       **extra).last_hidden_state
        picked = hidden[:, width - 1:width - 1 + size]
        logits = self.module.get_output_embeddings()(picked).double()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logp = torch.log_softmax(logits, dim=-1)
        loglik = logp.gather(-1, answer[None, :, None].expand(count, -1, 1))[..., 0].sum(dim=1)
        if answer_index == 0:
            return loglik
        return torch.log(-torch.expm1(loglik))  # log(1 - p): "(other)"

    # -- gradient protocol -----------------------------------------------------------------

    def input_gradients(self, image: ImageInput, question: str, *,
                        answer: str | int | None = None, guided: bool = False
                        ) -> InputGradients:
        """Gradients of the log score of ``answer`` (default: the explained answer, index
        0) w.r.t. ``pixel_values [3, H, W]`` and each question word's embedding (``words
        [W, D]``: sub-word gradients summed; ``None`` with ``words_note`` when the
        question's tokens cannot be located in the prompt)."""
        question, encoded = self._grad_encoded(image, question, own_answer=True)
        values = np.asarray(self.answer_probs_batch([to_rgb_array(image)], [question])[0],
                            dtype=np.float64)
        index = resolve_answer(self.answers, answer, 0)
        ids = [int(t) for t in encoded["input_ids"][0].tolist()]
        embedding = self._embedding()
        with torch.inference_mode():
            vectors = embedding(encoded["input_ids"]).detach()
        leaf = encoded["pixel_values"].detach().float().clone().requires_grad_(True)
        words_leaf = vectors.float().clone().requires_grad_(True)
        with eval_mode(self.module), torch.inference_mode(False), torch.enable_grad():
            try:
                score = self.log_scores(encoded, leaf, words_leaf, index)[0]
                with guided_relu(guided) as mode:
                    grads = torch.autograd.grad(score, [leaf, words_leaf], allow_unused=True)
            except BlackboxVQAError:
                raise
            except Exception as exc:
                raise ModelError(f"{self.name}: gradient pass failed: {type(exc).__name__}: "
                                 f"{exc}") from exc
        image_grad, token_grad = (torch.zeros_like(w) if g is None else g
                                  for g, w in zip(grads, [leaf, words_leaf], strict=True))
        per_token = token_grad[0].detach().float().cpu().numpy()
        positions = self._word_positions(question, ids)
        words: NDArray[np.float32] | None = None
        note = ""
        if positions is None:
            note = f"{self.name}: the question's tokens were not found in the prompt"
        else:
            words = np.stack([per_token[list(p)].sum(axis=0) if p else
                              np.zeros(per_token.shape[1], np.float32)
                              for p in positions]).astype(np.float32)
        return InputGradients(
            image=image_grad[0].detach().float().cpu().numpy(), words=words,
            token_ids=tuple(ids), answer_index=index, predicted_index=0, scores=values,
            guided=guided, words_note=note, relus_guided=None if mode is None else mode.calls)

    # -- path-gradient protocol ------------------------------------------------------------

    def gradient_inputs(self, image: ImageInput, question: str) -> GradientInputs:
        """``pixel_values [3, H, W]``, the prompt's token embeddings ``[T, D]``, the padding
        token's embedding, each question word's token positions and the scores. The
        explained answer stays the one already chosen (the first input's, as for scores)."""
        question, encoded = self._grad_encoded(image, question, own_answer=False)
        scores = np.asarray(self.answer_probs_batch([to_rgb_array(image)], [question])[0],
                            dtype=np.float64)
        ids = [int(t) for t in encoded["input_ids"][0].tolist()]
        embedding = self._embedding()
        pad_id = self.pad_id
        with torch.inference_mode():
            vectors = embedding(encoded["input_ids"])[0].float().cpu().numpy()
            pad = embedding(torch.tensor([pad_id], device=self.device))[0].float().cpu().numpy()
        positions = self._word_positions(question, ids)
        note = "" if positions is not None else \
            f"{self.name}: the question's tokens were not found in the prompt"
        if positions is None:
            vectors = np.zeros((len(ids), 0), np.float32)
            pad = np.zeros(0, np.float32)
        return GradientInputs(
            question=question,
            image=encoded["pixel_values"][0].float().cpu().numpy(),
            embeddings=vectors, pad_embedding=pad, word_positions=positions or (),
            token_ids=tuple(ids), scores=scores, words_note=note)

    def path_gradients(self, inputs: GradientInputs, images: NDArray[np.float32],
                       embeddings: NDArray[np.float32], answer_index: int) -> PathGradients:
        """Log score of ``answers[answer_index]`` and its gradients at ``N`` points."""
        check_points(inputs, images, embeddings)
        encoded = {"input_ids": torch.tensor([list(inputs.token_ids)], device=self.device)}
        if "token_type_ids" in self._probe_keys(inputs):
            encoded["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
        words = None if embeddings.shape[-1] == 0 else \
            torch.from_numpy(embeddings).to(self.device)

        def score_fn(image_leaf: torch.Tensor, word_leaf: torch.Tensor | None
                     ) -> torch.Tensor:
            return self.log_scores(encoded, image_leaf, word_leaf, answer_index)

        with eval_mode(self.module):
            scores, image_grad, word_grad = score_gradients(
                score_fn, torch.from_numpy(images).to(self.device), words, name=self.name)
        if word_grad is None:
            word_grad = np.zeros(embeddings.shape, np.float32)
        return PathGradients(scores=scores, image=image_grad, embeddings=word_grad)

    def _probe_keys(self, inputs: GradientInputs) -> set[str]:
        """The processor's tensor names for this question (cached per question)."""
        cache: dict[str, set[str]] = self.__dict__.setdefault("_gradient_keys", {})
        if inputs.question not in cache:
            height, width = inputs.image.shape[-2:]
            probe = np.zeros((height, width, 3), np.uint8)
            cache[inputs.question] = set(self.encode([_levels(probe)], [inputs.question]))
        return cache[inputs.question]


def _levels(image: NDArray[Any]) -> NDArray[np.uint8]:
    """``image`` as whole 0-255 levels (rounded to nearest), as the adapter scores it."""
    if image.dtype == np.uint8:
        return np.asarray(image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _dtype(module: Any) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype  # type: ignore[no-any-return]
    return torch.float32
