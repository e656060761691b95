"""Gradients of generative VLMs: the gradient and path-gradient protocols for
:class:`~blackbox_vqa.adapters.hf.generative.GenerativeAdapter` (a mixin).

The score differentiated is the log of the explained answer's score: for the answer
itself its teacher-forced log-likelihood ``sum_i log p(token_i | image, prompt,
tokens_<i)`` (the quantity the adapter scores, end-of-sequence included as there), for
``"(other)"`` ``log(1 - p)``. Inputs are the processor's image ``[3, H, W]`` (below) and the
word-embedding vectors of the prompt's ``T`` tokens (``get_input_embeddings()`` output,
replaced by a forward hook; the answer's embeddings stay fixed). A question word's
gradient is the sum of its sub-word tokens' gradients.

The image input is one ``[3, H, W]`` tensor at the processor's resolution, whatever the
family's ``pixel_values`` layout: LLaVA and PaliGemma give it as is (``[1, 3, H, W]``);
Qwen2-VL gives flattened patches ``[h * w, 3 * T * P * P]`` with ``image_grid_thw``, which
:func:`patches_to_image` turns back into the resized image exactly (the processor repeats
the image ``T`` times in time) and :func:`image_to_patches` flattens again inside the
differentiated pass, so the image gradient is the sum over the temporal copies; Idefics3
with one tile (no image splitting) gives ``[1, 1, 3, H, W]``. Idefics3 with several tiles
(crops plus a downscaled global view, so no one tensor holds what the model sees) and any
other layout raise :class:`GradientUnavailableError` with the reason, so their gradient
methods are recorded as unavailable; so does candidate mode (``--answers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.gradients import InputGradients
from blackbox_vqa.adapters.gradients import answer_index as resolve_answer
from blackbox_vqa.adapters.hf.generative_host import GenerativeHost
from blackbox_vqa.adapters.hf.generative_inputs import whole_levels
from blackbox_vqa.adapters.hf.processing import word_positions
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.adapters.torch.hooks import embedding_output_hook, guided_relu
from blackbox_vqa.adapters.torch.path_gradients import (
    GradientInputs,
    PathGradients,
    check_points,
    score_gradients,
)
from blackbox_vqa.errors import (
    BlackboxVQAError,
    GradientUnavailableError,
    InputError,
    ModelError,
)
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = ["GenerativeGradients", "image_to_patches", "patches_to_image",
           "question_positions"]


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


def patches_to_image(patches: torch.Tensor, grid: tuple[int, int], *, patch: int,
                     merge: int, temporal: int) -> torch.Tensor:
    """Qwen2-VL's flattened patches ``[h * w, C * temporal * patch * patch]`` of one image
    (``grid = (h, w)`` in patches) back to the resized image ``[C, h * patch, w * patch]``.

    Inverts the processor's order: rows run over ``(h / merge, w / merge, merge, merge)``,
    each row over ``(C, temporal, patch, patch)``; the image is the first temporal copy (an
    image's copies are equal). Exact: no arithmetic, only a reshape and a transpose.
    """
    rows, size = grid
    if rows % merge or size % merge or patches.shape[0] != rows * size:
        raise ValueError(f"{patches.shape[0]} patches do not make a {rows}x{size} grid in "
                         f"{merge}x{merge} groups")
    channels = patches.shape[1] // (temporal * patch * patch)
    if channels * temporal * patch * patch != patches.shape[1]:
        raise ValueError(f"a patch row of {patches.shape[1]} values is not C x {temporal} x "
                         f"{patch} x {patch}")
    x = patches.reshape(rows // merge, size // merge, merge, merge, channels, temporal,
                        patch, patch)[:, :, :, :, :, 0]
    # (h/m, w/m, m, m, C, P, P) -> (C, h/m, m, P, w/m, m, P)
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, rows * patch, size * patch)


def image_to_patches(images: torch.Tensor, *, patch: int, merge: int, temporal: int
                     ) -> torch.Tensor:
    """``images [N, C, H, W]`` as Qwen2-VL's processor flattens them: ``[N * h * w, C *
    temporal * patch * patch]`` (``h = H / patch``, ``w = W / patch``), each image's rows in
    turn, the image repeated ``temporal`` times; differentiable (the gradient of an image
    pixel is the sum over its temporal copies)."""
    count, channels, height, width = images.shape
    rows, size = height // patch, width // patch
    x = images.reshape(count, channels, rows // merge, merge, patch, size // merge, merge,
                       patch)
    # (N, C, h/m, m, P, w/m, m, P) -> (N, h/m, w/m, m, m, C, P, P), then time after C
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
    x = x.expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(count * rows * size, channels * temporal * patch * patch)


@dataclass(frozen=True)
class PixelLayout:
    """How one ``[3, H, W]`` image enters a family's model.

    Attributes:
        kind: ``"image"`` (``pixel_values [1, 3, H, W]``), ``"patches"`` (Qwen2-VL
            flattened patches with ``image_grid_thw``) or ``"tile"`` (Idefics3, one tile
            ``[1, 1, 3, H, W]`` with ``pixel_attention_mask``).
        grid: ``(h, w)`` patches of a ``"patches"`` image.
        patch, merge, temporal: Qwen2-VL's patch size, spatial merge size and temporal
            patch size.
    """

    kind: str
    grid: tuple[int, int] = (0, 0)
    patch: int = 0
    merge: int = 0
    temporal: int = 0

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's ``pixel_values`` as one image ``[3, H, W]``."""
        if self.kind == "patches":
            return patches_to_image(pixels, self.grid, patch=self.patch, merge=self.merge,
                                    temporal=self.temporal)
        return pixels.reshape(pixels.shape[-3:])

    def model_inputs(self, images: torch.Tensor, encoded: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """The model's image arguments for ``N`` points ``images [N, 3, H, W]`` (the other
        image tensors of ``encoded``, made for one input, repeated ``N`` times)."""
        count = images.shape[0]
        if self.kind == "patches":
            return {"pixel_values": image_to_patches(images, patch=self.patch,
                                                     merge=self.merge, temporal=self.temporal),
                    "image_grid_thw": encoded["image_grid_thw"].expand(count, -1)}
        if self.kind == "tile":
            mask = encoded["pixel_attention_mask"]
            return {"pixel_values": images[:, None],
                    "pixel_attention_mask": mask.expand(count, *mask.shape[1:])}
        return {"pixel_values": images}


def pixel_layout(encoded: dict[str, torch.Tensor], config: Any
                 ) -> tuple[PixelLayout | None, str]:
    """The layout of one input's ``encoded`` tensors, or ``None`` and why the image cannot
    be differentiated as one ``[3, H, W]`` tensor (``config``: the model's, for Qwen2-VL's
    patch sizes)."""
    pixels = encoded.get("pixel_values")
    if pixels is None:
        return None, "its processor gives no pixel_values, so there is no image to differentiate"
    shape = "x".join(map(str, pixels.shape))
    if "image_grid_thw" in encoded:
        vision = getattr(config, "vision_config", None)
        sizes = [getattr(vision, k, None) for k in ("patch_size", "spatial_merge_size",
                                                    "temporal_patch_size")]
        grid = encoded["image_grid_thw"]
        if not all(isinstance(v, int) and v > 0 for v in sizes):
            return None, ("its flattened patches (pixel_values of shape " + shape + ") come "
                          "with no patch_size, spatial_merge_size and temporal_patch_size in "
                          "the vision config to unflatten them into the image")
        patch, merge, temporal = (int(v) for v in sizes)  # type: ignore[arg-type]
        if tuple(grid.shape) != (1, 3) or int(grid[0, 0]) != 1:
            return None, (f"image_grid_thw {grid.tolist()} is not one image of one frame, "
                          "so its patches cannot be laid out as one image")
        rows, size = int(grid[0, 1]), int(grid[0, 2])
        if (pixels.ndim != 2 or pixels.shape[0] != rows * size
                or pixels.shape[1] != 3 * temporal * patch * patch
                or rows % merge or size % merge):
            return None, (f"its flattened patches (pixel_values of shape {shape}) do not "
                          f"match image_grid_thw {grid.tolist()} and patch size {patch}, "
                          "so they cannot be laid out as one image")
        return PixelLayout("patches", (rows, size), patch, merge, temporal), ""
    if pixels.ndim == 5 and pixels.shape[0] == 1 and pixels.shape[2] == 3:
        if pixels.shape[1] != 1:
            return None, (f"its processor splits the image into {pixels.shape[1]} tiles "
                          f"(pixel_values of shape {shape}: crops plus a downscaled global "
                          "view), so no one image tensor holds what the model sees (with "
                          "image splitting off, one tile, gradients are available)")
        mask = encoded.get("pixel_attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            return None, (f"its one tile (pixel_values of shape {shape}) is partly "
                          "padding, so the tile is not the image")
        return PixelLayout("tile"), ""
    if pixels.ndim == 4 and pixels.shape[0] == 1 and pixels.shape[1] == 3:
        return PixelLayout("image"), ""
    return None, (f"its processor gives pixel_values of shape {shape}, not one image, "
                  "flattened Qwen2-VL patches or one Idefics3 tile, so gradients cannot be "
                  "shown as an image map")


class GenerativeGradients(GenerativeHost):
    """Gradient and path-gradient protocols for a generative adapter (see module doc).

    Uses the host adapter's ``module``, ``processor``, ``tokenizer``, ``prompts``,
    ``encode``, ``answer_ids``, ``candidates``, ``softcap``, ``device`` and ``name``.
    """

    # -- checks and inputs -----------------------------------------------------------------

    def gradients_unavailable(self, encoded: dict[str, torch.Tensor] | None = None
                              ) -> str | None:
        """Why this model's gradients are unavailable (``None``: they are available)."""
        if self.candidates:
            return (f"{self.name}: gradients are not implemented with candidate answers "
                    "(--answers); explain the model's own answer or one --answer")
        if encoded is None:
            return None
        layout, why = pixel_layout(encoded, getattr(self.module, "config", None))
        if layout is None:
            return f"{self.name} ({type(self.module).__name__}): {why}"
        extra = sorted(set(encoded) - _KNOWN)
        if extra:
            return (f"{self.name}: its processor also gives {', '.join(extra)}, which the "
                    "gradient pass does not handle")
        return None

    def _grad_encoded(self, image: ImageInput, question: str, *, own_answer: bool
                      ) -> tuple[str, dict[str, torch.Tensor], PixelLayout]:
        """``own_answer``: explain this input's own answer (``prepare``); else keep the
        answer already chosen (a path's baseline must not change the answer)."""
        reason = self.gradients_unavailable()
        if reason:
            raise GradientUnavailableError(reason)
        question = self.validate_question(question)
        pixels = to_rgb_array(image)
        if own_answer or (not self._fixed and self._prepared is None):
            self.prepare(pixels, question)
        encoded = self.encode([whole_levels(pixels)], [question])
        reason = self.gradients_unavailable(encoded)
        layout, _ = pixel_layout(encoded, getattr(self.module, "config", None))
        if reason or layout is None:
            raise GradientUnavailableError(reason or f"{self.name}: no image layout")
        shape = tuple(layout.image(encoded["pixel_values"]).shape)
        self.__dict__.setdefault("_gradient_fixed", {})[(question, shape)] = (
            {k: v for k, v in encoded.items() if k not in ("pixel_values", "attention_mask")},
            layout)
        return question, encoded, layout

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

    def log_scores(self, encoded: dict[str, torch.Tensor], layout: PixelLayout,
                   images: torch.Tensor, embeddings: torch.Tensor | None, answer_index: int
                   ) -> torch.Tensor:
        """``[N]``: log score of ``answers[answer_index]`` at ``N`` points ``images
        [N, 3, H, W]`` and prompt embeddings ``[N, T, D]`` (``None``: the model's own),
        differentiable; the prompt's tokens and other tensors are ``encoded``'s (one
        input), the images enter the model as ``layout`` says."""
        ids = encoded["input_ids"]
        count, width = images.shape[0], ids.shape[1]
        answer = torch.tensor(list(self.answer_ids), dtype=ids.dtype, device=ids.device)
        size = answer.shape[0]
        full = torch.cat([ids, answer[None]], dim=1).expand(count, -1)
        mask = torch.ones_like(full)
        extra: dict[str, torch.Tensor] = {}
        for key, value in encoded.items():  # per-token tensors: the answer's are text (0)
            if key not in _TOKENS and tuple(value.shape) == (1, width):
                extra[key] = torch.cat([value, value.new_zeros((1, size))], dim=1
                                       ).expand(count, -1)
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
            pixels = layout.model_inputs(images.to(_dtype(self.module)), encoded)
            hidden = self.module.model(input_ids=full, attention_mask=mask, **pixels,
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
        0) w.r.t. the processor's image ``[3, H, W]`` and each question word's embedding (``words
        [W, D]``: sub-word gradients summed; ``None`` with ``words_note`` when the
        question's tokens cannot be located in the prompt)."""
        question, encoded, layout = self._grad_encoded(image, question, own_answer=True)
        values = np.asarray(self.answer_probs_batch([to_rgb_array(image)], [question])[0],
                            dtype=np.float64)
        index = resolve_answer(self.answers, answer, 0)
        ids = [int(t) for t in encoded["input_ids"][0].tolist()]
        embedding = self._embedding()
        with torch.inference_mode():
            vectors = embedding(encoded["input_ids"]).detach()
        leaf = layout.image(encoded["pixel_values"]).detach().float()[None].clone()
        leaf.requires_grad_(True)
        words_leaf = vectors.float().clone().requires_grad_(True)
        with eval_mode(self.module), torch.inference_mode(False), torch.enable_grad():
            try:
                score = self.log_scores(encoded, layout, leaf, words_leaf, index)[0]
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
        """The processor's image ``[3, H, W]``, the prompt's token embeddings ``[T, D]``,
        the padding token's embedding, each question word's token positions and the scores.
        The explained answer stays the one already chosen (the first input's, as for
        scores)."""
        question, encoded, layout = self._grad_encoded(image, question, own_answer=False)
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
            image=layout.image(encoded["pixel_values"]).float().cpu().numpy(),
            embeddings=vectors, pad_embedding=pad, word_positions=positions or (),
            token_ids=tuple(ids), scores=scores, words_note=note)

    def path_gradients(self, inputs: GradientInputs, images: NDArray[np.float32],
                       embeddings: NDArray[np.float32], answer_index: int) -> PathGradients:
        """Log score of ``answers[answer_index]`` and its gradients at ``N`` points."""
        check_points(inputs, images, embeddings)
        encoded, layout = self._fixed_tensors(inputs)
        words = None if embeddings.shape[-1] == 0 else \
            torch.from_numpy(embeddings).to(self.device)

        def score_fn(image_leaf: torch.Tensor, word_leaf: torch.Tensor | None
                     ) -> torch.Tensor:
            return self.log_scores(encoded, layout, image_leaf, word_leaf, answer_index)

        with eval_mode(self.module):
            scores, image_grad, word_grad = score_gradients(
                score_fn, torch.from_numpy(images).to(self.device), words, name=self.name)
        if word_grad is None:
            word_grad = np.zeros(embeddings.shape, np.float32)
        return PathGradients(scores=scores, image=image_grad, embeddings=word_grad)

    def _fixed_tensors(self, inputs: GradientInputs
                       ) -> tuple[dict[str, torch.Tensor], PixelLayout]:
        """The processor's tensors but the pixels and mask for ``inputs`` (kept from
        ``gradient_inputs``, else from a probe image of the model's resolution) and the
        image layout."""
        cache: dict[Any, Any] = self.__dict__.setdefault("_gradient_fixed", {})
        key = (inputs.question, tuple(inputs.image.shape))
        if key not in cache:
            height, width = inputs.image.shape[-2:]
            probe = np.zeros((height, width, 3), np.uint8)
            self._grad_encoded(probe, inputs.question, own_answer=False)
        if key not in cache:
            raise ModelError(f"{self.name}: a {height}x{width} image does not keep its size "
                             "in the processor")
        tensors, layout = cache[key]
        ids = [int(t) for t in tensors["input_ids"][0].tolist()]
        if ids != list(inputs.token_ids):
            raise InputError(f"{self.name}: the path's token ids are not the processor's "
                             f"for {inputs.question!r}")
        return tensors, layout


_TOKENS = {"input_ids", "attention_mask", "token_type_ids"}
_KNOWN = _TOKENS | {"pixel_values", "image_grid_thw", "mm_token_type_ids",
                    "pixel_attention_mask"}



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
