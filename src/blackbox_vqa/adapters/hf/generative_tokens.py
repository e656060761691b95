"""Image-token ablation for generative VLMs (token occlusion, issue 22): the
:class:`~blackbox_vqa.adapters.capabilities.SupportsTokenAblation` capability of
:class:`~blackbox_vqa.adapters.hf.generative.GenerativeAdapter` (a mixin).

The image becomes a ``rows x cols`` lattice of image tokens in the language model's input,
row-major (:func:`lattice_shape`):

- LLaVA: CLIP's patch grid ``H/p x W/p`` after the feature-select strategy (``"full"``
  keeps the class token first: it is no lattice token and is never ablated);
- Idefics3 / SmolVLM: one tile's pixel-shuffled grid ``H/(p s) x W/(p s)`` (``s`` the
  scale factor; token ``(r, c)`` pools patches ``r s .. r s + s - 1`` by
  ``c s .. c s + s - 1``); a processor that splits images into tiles is refused;
- Qwen2-VL: the merged-patch grid ``h/m x w/m`` of ``image_grid_thw`` (``m`` the spatial
  merge size, one frame);
- PaliGemma: SigLIP's patch grid ``H/p x W/p``.

An ablated token is left out of attention: its attention-mask entry is 0, so no query
attends to it, while every position id stays that of the unablated input (Qwen2-VL's
M-RoPE ids are computed once, from the full mask, and passed explicitly). The vision tower
runs once per call. On the causal families (LLaVA, Idefics3, Qwen2-VL) the original's
key/value cache is kept and the cells, sorted by their first ablated position, run in
batches from their batch's earliest ablated position on (nothing before it changes);
PaliGemma's prefix attends bidirectionally, so each row runs the whole language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.adapters.hf.calls import wrapped
from blackbox_vqa.adapters.hf.generative_host import GenerativeHost
from blackbox_vqa.adapters.hf.generative_inputs import whole_levels
from blackbox_vqa.adapters.hf.generative_reuse import encoder_outputs, expanded
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.errors import InputError, ModelError, NotSupportedError
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = ["GenerativeTokenAblation", "Lattice", "answer_logprobs", "cell_batches",
           "config_refusal", "image_lattice", "lattice_shape"]

PIXEL_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw")
_GRID_PROMPT = "what is in the image"


@dataclass(frozen=True)
class Lattice:
    """The image tokens of one encoded prompt: ``positions[r * cols + c]`` is the sequence
    index of lattice token ``(r, c)``; ``image_positions`` every image-token index (the
    vision features fill them in order; LLaVA's ``"full"`` class token included)."""

    rows: int
    cols: int
    positions: tuple[int, ...]
    image_positions: tuple[int, ...]

    def cell_positions(self, cell: Sequence[tuple[int, int]]) -> list[int]:
        """Sorted sequence indices of a cell's ``(row, col)`` tokens; InputError when one
        is outside the lattice."""
        found = set()
        for item in cell:
            r, c = int(item[0]), int(item[1])
            if not (0 <= r < self.rows and 0 <= c < self.cols):
                raise InputError(f"token ({r}, {c}) is outside the {self.rows} x {self.cols} "
                                 "image-token lattice")
            found.add(self.positions[r * self.cols + c])
        return sorted(found)


def config_refusal(model_type: str, config: Any, processor: Any) -> str | None:
    """Why this model has no known image-token lattice (None: it has one, given an image)."""
    if model_type not in ("llava", "idefics3", "qwen2_vl", "paligemma"):
        return (f"no known image-token lattice for model type {model_type!r} (token occlusion "
                "covers LLaVA, Idefics3/SmolVLM, Qwen2-VL and PaliGemma)")
    if model_type == "llava":
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            return f"LLaVA's vision_feature_select_strategy {strategy!r} is not a patch grid"
    if model_type == "idefics3" and getattr(getattr(processor, "image_processor", None),
                                            "do_image_splitting", False):
        return ("the Idefics3 processor splits images into tiles (do_image_splitting): no "
                "one lattice covers the image; set do_image_splitting to false")
    return None


def lattice_shape(model_type: str, config: Any, encoded: dict[str, torch.Tensor]
                  ) -> tuple[int, int, int]:
    """``(rows, cols, skipped)`` of one encoded input's image tokens: ``skipped`` leading
    image tokens are not lattice tokens (LLaVA's class token). NotSupportedError when the
    processor's output does not give one lattice."""
    vision = getattr(config, "vision_config", None)
    if model_type == "qwen2_vl":
        grid = encoded["image_grid_thw"]
        merge = int(getattr(vision, "spatial_merge_size", 2))
        if grid.shape[0] != 1 or int(grid[0, 0]) != 1:
            raise NotSupportedError(f"token occlusion needs one image of one frame, got "
                                    f"image_grid_thw {grid.tolist()}")
        return int(grid[0, 1]) // merge, int(grid[0, 2]) // merge, 0
    pixels = encoded["pixel_values"]
    patch = int(getattr(vision, "patch_size", 0) or 0)
    if patch < 1:
        raise NotSupportedError(f"{model_type}: the vision config gives no patch size")
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    if model_type == "idefics3":
        if pixels.dim() != 5 or pixels.shape[1] != 1:
            raise NotSupportedError(f"token occlusion needs one image tile, the processor gave "
                                    f"{int(pixels.shape[1])}")
        scale = int(getattr(config, "scale_factor", 1))
        return height // patch // scale, width // patch // scale, 0
    skipped = int(model_type == "llava"
                  and getattr(config, "vision_feature_select_strategy", "default") == "full")
    return height // patch, width // patch, skipped


def image_lattice(model_type: str, config: Any, encoded: dict[str, torch.Tensor],
                  image_token: int) -> Lattice:
    """The :class:`Lattice` of one encoded input (batch 1); NotSupportedError when the
    prompt's image tokens are not ``skipped + rows * cols``."""
    rows, cols, skipped = lattice_shape(model_type, config, encoded)
    where = tuple(int(i) for i in (encoded["input_ids"][0] == image_token).nonzero()[:, 0])
    if rows < 1 or cols < 1 or len(where) != skipped + rows * cols:
        raise NotSupportedError(f"the prompt holds {len(where)} image tokens, not the "
                                f"{rows} x {cols} lattice (+{skipped}) its pixels give")
    return Lattice(rows, cols, where[skipped:], where)


def cell_batches(firsts: Sequence[int], size: int) -> list[list[int]]:
    """Cell indices in batches of at most ``size``, ordered by first ablated position
    (``firsts[i]`` of cell ``i``; ties keep the cells' order)."""
    order = sorted(range(len(firsts)), key=lambda i: (firsts[i], i))
    return [order[s:s + size] for s in range(0, len(order), size)]


def answer_logprobs(module: Any, picked: torch.Tensor, answer: torch.Tensor,
                    softcap: float | None) -> torch.Tensor:
    """``[B, L]`` (float64) log p(answer token i | ...) from the last hidden states
    ``picked [B, L, H]`` at the positions that predict them (output head, optional logit
    soft-capping, log-softmax over the vocabulary)."""
    logits = module.get_output_embeddings()(picked).double()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, answer[None, :, None].expand(picked.shape[0], -1, 1))[..., 0]


class GenerativeTokenAblation(GenerativeHost):
    """``SupportsTokenAblation`` for a generative adapter (see module doc).

    Uses the host adapter's ``module``, ``processor``, ``encode``, ``answer_ids``,
    ``candidates``, ``softcap``, ``batch_size``, ``reuse``, ``model_type`` and ``name``.
    """

    token_baseline = "attention-mask"

    def token_ablation_unavailable(self) -> str | None:
        """Why this model has no image-token lattice (None: it has one)."""
        return config_refusal(self.model_type, self.module.config, self.processor)

    def _lattice(self, encoded: dict[str, torch.Tensor]) -> Lattice:
        reason = self.token_ablation_unavailable()
        if reason:
            raise NotSupportedError(f"{self.name}: {reason}")
        image_token = int(self.reuse.image_token)
        try:
            return image_lattice(self.model_type, self.module.config, encoded, image_token)
        except NotSupportedError as exc:
            raise NotSupportedError(f"{self.name}: {exc}") from exc

    def image_token_grid(self, image: ImageInput) -> tuple[int, int]:
        """``(rows, cols)`` of the image tokens the processor makes of ``image``."""
        encoded = self.encode([whole_levels(to_rgb_array(image))], [_GRID_PROMPT])
        lattice = self._lattice(encoded)
        return lattice.rows, lattice.cols

    def token_ablation_scores(
        self, image: ImageInput, question: str, cells: Sequence[Sequence[tuple[int, int]]]
    ) -> NDArray[np.float64]:
        """Scores ``[1 + len(cells), A]`` (float64): the original input, then the input with
        each cell's image tokens left out of attention (see module doc)."""
        question = self.validate_question(question)
        pixels = to_rgb_array(image)
        self.prepare(pixels, question)
        encoded = self.encode([whole_levels(pixels)], [question])
        lattice = self._lattice(encoded)
        ablated = [lattice.cell_positions(cell) for cell in cells]
        sequences = self._candidates_ids() if self.candidates else [self.answer_ids]
        with eval_mode(self.module), torch.inference_mode(), \
                wrapped(self.name, "token occlusion"):
            features = self._image_features(encoded, len(lattice.image_positions))
            logliks = np.stack([self._ablated_logliks(encoded, list(ids), features, lattice,
                                                      ablated) for ids in sequences], axis=1)
        if self.candidates:
            shifted = np.exp(logliks - logliks.max(axis=1, keepdims=True))
            return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float64)
        prob = np.exp(logliks[:, 0])
        return np.stack([prob, np.clip(1.0 - prob, 0.0, 1.0)], axis=1)

    def _image_features(self, encoded: dict[str, torch.Tensor], count: int) -> torch.Tensor:
        """``[N, H]``: the projected image features of the one image (one vision pass)."""
        pixel = {k: v for k, v in encoded.items() if k in PIXEL_INPUTS}
        pooled = self.module.model.get_image_features(**pixel, return_dict=True).pooler_output
        flat = (torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
                if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1]))
        if flat.shape[0] != count:
            raise ModelError(f"{self.name}: the vision tower gave {flat.shape[0]} image "
                             f"features for {count} image tokens")
        return flat

    def _ablated_logliks(self, encoded: dict[str, torch.Tensor], answer_ids: list[int],
                         features: torch.Tensor, lattice: Lattice,
                         ablated: list[list[int]]) -> NDArray[np.float64]:
        """``[1 + C]`` (float64) log p(answer | input): the original, then each cell."""
        ids = encoded["input_ids"]
        prompt = ids.shape[1]
        answer = torch.tensor(answer_ids, dtype=ids.dtype, device=ids.device)
        full = torch.cat([ids, answer[None]], dim=1)
        width = full.shape[1]
        texts = self._text_inputs(encoded, len(answer_ids))
        positions = self._positions(full, texts, encoded)
        predicting = torch.arange(prompt - 1, width - 1, device=ids.device)
        causal = bool(self.reuse.enabled and self.reuse.prefix_kv
                      and self.reuse.full_attention_cache())
        base = self.module.model
        cache: Any = None
        kwargs: dict[str, Any] = {}
        if causal:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.module.config)
            kwargs = {"cache": cache, "use_cache": True}
        hidden = base(input_ids=full, attention_mask=torch.ones_like(full),
                      position_ids=positions, **texts, **kwargs,
                      mm_encoder_outputs=encoder_outputs(self.model_type, [features])
                      ).last_hidden_state
        rows = [answer_logprobs(self.module, hidden[:, predicting], answer, self.softcap)]
        firsts = [cell[0] if cell else width for cell in ablated]
        out: list[torch.Tensor | None] = [None] * len(ablated)
        for batch in cell_batches(firsts, self.batch_size):
            start = min(firsts[batch[0]], prompt - 1) if causal else 0
            found = self._ablated_batch(full, [ablated[i] for i in batch], start, cache,
                                        texts, positions, features, lattice)
            scored = answer_logprobs(self.module, found[:, predicting - start], answer,
                                     self.softcap)
            for row, index in enumerate(batch):
                out[index] = scored[row:row + 1]
        rows.extend(r for r in out if r is not None)
        return torch.cat(rows).sum(dim=1).cpu().numpy()

    def _ablated_batch(self, full: torch.Tensor, cells: list[list[int]], start: int,
                       cache: Any, texts: dict[str, torch.Tensor], positions: torch.Tensor,
                       features: torch.Tensor, lattice: Lattice) -> torch.Tensor:
        """``[G, T - start, H]``: last hidden states from ``start`` on of the rows with each
        cell's positions masked out, the original's cache reused before ``start``."""
        count, width = len(cells), full.shape[1]
        mask = torch.ones((count, width), dtype=full.dtype, device=full.device)
        for row, where in enumerate(cells):
            mask[row, where] = 0
        before = sum(p < start for p in lattice.image_positions)
        kwargs: dict[str, Any] = {k: v[:, start:].expand(count, -1) for k, v in texts.items()}
        if start > 0:
            kwargs.update(cache=expanded(cache, count, start), use_cache=True)
        if before < features.shape[0]:
            kwargs["mm_encoder_outputs"] = encoder_outputs(
                self.model_type, [features[before:]] * count)
        moved = positions[..., start:]
        moved = moved.expand(*moved.shape[:-2], count, moved.shape[-1])
        return self.module.model(input_ids=full[:, start:].expand(count, -1),
                                 attention_mask=mask, position_ids=moved,
                                 **kwargs).last_hidden_state  # type: ignore[no-any-return]

    def _text_inputs(self, encoded: dict[str, torch.Tensor], size: int
                     ) -> dict[str, torch.Tensor]:
        """Per-token tensors other than ids and mask, grown over the ``size`` answer tokens
        (text: 0; PaliGemma's ``token_type_ids``: prefix 0, answer 1). Qwen2-VL's
        ``mm_token_type_ids`` serve its position ids only, which are passed explicitly."""
        skipped = ("input_ids", "attention_mask", "mm_token_type_ids", *PIXEL_INPUTS)
        return {key: torch.nn.functional.pad(value, (0, size),
                                             value=int(key == "token_type_ids"))
                for key, value in encoded.items()
                if key not in skipped and value.shape == encoded["input_ids"].shape}

    def _positions(self, full: torch.Tensor, texts: dict[str, torch.Tensor],
                   encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unablated input's position ids: Qwen2-VL's M-RoPE ids ``[3, 1, T]`` from its
        own ``get_rope_index`` over the full mask; else ``[1, T]`` counting from 0
        (PaliGemma: from 1, as its model does)."""
        width = full.shape[1]
        if self.model_type == "qwen2_vl":
            types = torch.nn.functional.pad(encoded["mm_token_type_ids"],
                                            (0, width - encoded["input_ids"].shape[1]))
            rope, _ = self.module.model.get_rope_index(
                full, types, image_grid_thw=encoded["image_grid_thw"],
                attention_mask=torch.ones_like(full))
            return rope  # type: ignore[no-any-return]
        first = 1 if self.model_type == "paligemma" else 0
        return torch.arange(first, first + width, device=full.device)[None]

