"""Reuse across the inputs of one explanation of a generative VLM: the vision tower's output
and the key/value cache of the prompt prefix the inputs share.

Two caches, both bounded and cleared whenever the adapter prepares a new input:

- **vision**: the image features after the projector (what the model scatters into its
  image-token positions), keyed by each input's image key: the adapter's SHA-1 digest of
  the ``uint8`` image it gave the (deterministic) processor, computed on the host once per
  input, or without one a digest of the row's processed pixel tensors.
  Word-drop inputs share the original image, so its vision-tower pass runs once; the
  distinct images of one batch (image occlusion) run in one batched vision pass. The
  first image computed after a clear (the explained input's) is kept for the whole
  explanation; the others are kept least-recently-used, ``VISION_ENTRIES`` at most.
- **prefix**: the language model's key/value cache (``DynamicCache``) of the longest token
  prefix shared by a group of rows, computed once at batch 1 and expanded over the
  group, so the language model runs only each row's differing suffix and the answer.
  Rows sharing one image (word drops) share everything before the first changed
  question token, image tokens included; rows with different images (image occlusion)
  share the text before the first image token (cached only from ``MIN_PREFIX`` tokens on,
  e.g. a system prompt: the few tokens of a bare chat turn's header are not worth a pass).
  ``PREFIX_ENTRIES`` caches at most, LRU.

Per family (``FAMILIES``): LLaVA, Qwen2-VL and Idefics3 (SmolVLM) attend causally, so a
prefix's keys and values do not depend on what follows and both caches apply; Qwen2-VL's
M-RoPE position ids are computed by the model's ``get_rope_index`` over the whole
teacher-forced sequence and sliced for the prefix and the suffix. PaliGemma attends
bidirectionally over image and prompt (a changed question token changes the states of
the image tokens before it) and puts the image first, so only the vision output is
reused. Any other family takes the plain path (every input runs the whole model).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FAMILIES", "PREFIX_ENTRIES", "VISION_ENTRIES", "Reuse", "encoder_outputs",
           "expanded"]

#: model_type -> whether the prompt prefix's key/value cache may be reused (causal prefix)
FAMILIES = {"llava": True, "qwen2_vl": True, "idefics3": True, "paligemma": False}
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes")
VISION_ENTRIES = 8
PREFIX_ENTRIES = 4
#: shorter shared prefixes are not cached: a separate batch-1 pass plus a copy of its cache
#: into every row costs more than the few tokens it saves
MIN_PREFIX = 16


class Reuse:
    """The two caches of one adapter and the cached teacher-forced pass (see module doc).

    Args:
        model: the ``...ForConditionalGeneration`` model (``model.model`` is the base model
            with ``get_image_features``).
        model_type: ``config.model_type``; families outside ``FAMILIES`` are not handled.
    """

    def __init__(self, model: Any, model_type: str) -> None:
        self.model = model
        self.model_type = model_type
        self.enabled = model_type in FAMILIES
        self.prefix_kv = FAMILIES.get(model_type, False)
        self.image_token = int(getattr(model.config, "image_token_id", -1) or -1)
        self._pinned: tuple[str, torch.Tensor] | None = None
        self._vision: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prefixes: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._layers_ok: bool | None = None
        self.counts = {"vision_runs": 0, "vision_hits": 0, "prefix_runs": 0, "prefix_hits": 0}

    def clear(self) -> None:
        """Drop both caches (a new input is explained)."""
        self._pinned = None
        self._vision.clear()
        self._prefixes.clear()

    @property
    def sizes(self) -> tuple[int, int]:
        """``(vision entries, prefix entries)`` held now."""
        return len(self._vision) + (self._pinned is not None), len(self._prefixes)

    def applies(self, extra: dict[str, torch.Tensor], count: int) -> bool:
        """Whether this batch (one image per row) can take the cached path."""
        if not self.enabled or self.image_token < 0 or "pixel_values" not in extra:
            return False
        if "image_grid_thw" in extra:
            return int(extra["image_grid_thw"].shape[0]) == count
        return int(extra["pixel_values"].shape[0]) == count

    # -- the cached pass --------------------------------------------------------------------

    def picked(self, full: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor],
               positions: torch.Tensor, *, keys: Sequence[str] | None = None
               ) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` at ``positions [B, L]`` (absolute) of the
        teacher-forced rows ``full [B, T]`` (right-padded, ``mask [B, T]``); ``keys``: each
        row's image key (see the module doc; None: digests of the pixel tensors)."""
        count = full.shape[0]
        digests = (list(keys) if keys is not None and len(keys) == count
                   else [_digest(row) for row in self._pixel_rows(extra, count)])
        features = self._features(extra, digests, full)
        rope = self._rope(full, mask, extra)
        groups = self._groups(digests)
        if len(groups) == 1:  # one pass over the whole batch: no picking of rows
            group, shared = groups[0]
            hidden, offset = self._group_hidden(full, mask, extra, group, features,
                                                digests[0] if shared else None, rope)
            return hidden.gather(1, (positions - offset)[..., None].expand(
                -1, -1, hidden.shape[-1]))
        parts = []
        for group, shared in groups:
            index = torch.tensor(group, device=full.device)
            hidden, offset = self._group_hidden(full[index], mask[index], extra, group,
                                                [features[i] for i in group],
                                                digests[group[0]] if shared else None,
                                                None if rope is None else rope[:, index])
            parts.append((index, hidden.gather(1, (positions[index] - offset)[..., None].expand(
                -1, -1, hidden.shape[-1]))))
        out = parts[0][1].new_zeros((count, *parts[0][1].shape[1:]))
        for index, found in parts:
            out[index] = found
        return out

    def _groups(self, digests: list[str]) -> list[tuple[list[int], bool]]:
        """Rows grouped for one forward pass each: ``(rows, share one image)``. Rows sharing
        an image with another row form a group; all the others form one more."""
        by_image: dict[str, list[int]] = {}
        for row, digest in enumerate(digests):
            by_image.setdefault(digest, []).append(row)
        groups = [(rows, True) for rows in by_image.values() if len(rows) > 1]
        rest = [rows[0] for rows in by_image.values() if len(rows) == 1]
        if rest:
            groups.append((rest, False))
        return groups

    def _group_hidden(self, ids: torch.Tensor, mask: torch.Tensor,
                      extra: dict[str, torch.Tensor], group: list[int],
                      features: list[torch.Tensor], digest: str | None,
                      rope: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """``(hidden [G, T - P, H], P)``: the group's states after its shared prefix."""
        base = self.model.model
        size = self._prefix_length(ids, mask, shared_image=digest is not None)
        per_token = {k: v[group] for k, v in extra.items()
                     if k in ("token_type_ids",) and v.dim() == 2}
        if size == 0:
            kwargs: dict[str, Any] = dict(per_token)
            if rope is not None:
                kwargs["position_ids"] = rope
            out = base(input_ids=ids, attention_mask=mask,
                       mm_encoder_outputs=self._encoder_outputs(features), **kwargs)
            return out.last_hidden_state, 0
        images_in_prefix = int((ids[0, :size] == self.image_token).sum())
        cache = self._prefix(ids[0, :size], features[0][:images_in_prefix], digest,
                             None if rope is None else rope[:, :1, :size])
        suffix = [f[images_in_prefix:] for f in features]
        kwargs = {"cache": expanded(cache, ids.shape[0]), "use_cache": True}
        if rope is not None:
            kwargs["position_ids"] = rope[:, :, size:]
        if sum(int(f.shape[0]) for f in suffix):
            kwargs["mm_encoder_outputs"] = self._encoder_outputs(suffix)
        out = base(input_ids=ids[:, size:], attention_mask=mask, **kwargs)
        return out.last_hidden_state, size

    def _prefix_length(self, ids: torch.Tensor, mask: torch.Tensor, *, shared_image: bool
                       ) -> int:
        """Tokens every row shares (at most each row's prompt length minus one: the last
        prompt token's state is needed); before the first image token unless the rows
        share their image; 0 where the family's prefix is not causal or the prefix is
        shorter than ``MIN_PREFIX``."""
        if not self.prefix_kv or not self.full_attention_cache():
            return 0
        same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)
        size = min(int(same.sum()), int(mask.sum(dim=1).min()) - 1)
        if not shared_image:
            images = (ids[0, :max(size, 0)] == self.image_token).nonzero()
            if images.numel():
                size = int(images[0, 0])
        return size if size >= max(MIN_PREFIX, 1) else 0

    def full_attention_cache(self) -> bool:
        """Whether the model's ``DynamicCache`` holds plain full-attention layers only
        (sliding-window or other layers: no prefix reuse, the plain pass instead)."""
        if self._layers_ok is None:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            layers = DynamicCache(config=self.model.config).layers
            self._layers_ok = bool(layers) and all(type(x) is DynamicLayer for x in layers)
        return self._layers_ok

    def _prefix(self, ids: torch.Tensor, features: torch.Tensor, digest: str | None,
                rope: torch.Tensor | None) -> Any:
        """The ``DynamicCache`` of one prefix (batch 1), cached by its tokens and image."""
        key = (tuple(ids.tolist()), digest if features.shape[0] else None)
        found = self._prefixes.get(key)
        if found is not None:
            self._prefixes.move_to_end(key)
            self.counts["prefix_hits"] += 1
            return found
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        kwargs: dict[str, Any] = {"cache": cache, "use_cache": True}
        if rope is not None:
            kwargs["position_ids"] = rope
        if features.shape[0]:
            kwargs["mm_encoder_outputs"] = self._encoder_outputs([features])
        self.model.model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]),
                         **kwargs)
        self.counts["prefix_runs"] += 1
        self._prefixes[key] = cache
        while len(self._prefixes) > PREFIX_ENTRIES:
            self._prefixes.popitem(last=False)
        return cache

    def _rope(self, full: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor]
              ) -> torch.Tensor | None:
        """Qwen2-VL's M-RoPE position ids ``[3, B, T]`` of the whole teacher-forced rows
        (the model's own ``get_rope_index``); None for 1-D positions."""
        if "image_grid_thw" not in extra or "mm_token_type_ids" not in extra:
            return None
        positions, _ = self.model.model.get_rope_index(
            full, extra["mm_token_type_ids"], image_grid_thw=extra["image_grid_thw"],
            attention_mask=mask)
        return positions  # type: ignore[no-any-return]

    # -- vision -----------------------------------------------------------------------------

    def _features(self, extra: dict[str, torch.Tensor], digests: list[str],
                  full: torch.Tensor) -> list[torch.Tensor]:
        """Image features ``[n_row, H]`` of every row (``n_row`` its image tokens)."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}  # digest -> first row with it
        for row, digest in enumerate(digests):
            if digest in found or digest in missing:
                continue
            cached = self._lookup(digest)
            if cached is None:
                missing[digest] = row
            else:
                found[digest] = cached
                self.counts["vision_hits"] += 1
        if missing:
            todo = list(missing.values())
            stacked = self._pixels_of(extra, todo, full.shape[0])
            pooled = self.model.model.get_image_features(**stacked,
                                                         return_dict=True).pooler_output
            flat = (torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
                    if isinstance(pooled, (list, tuple)) else pooled.reshape(-1, pooled.shape[-1]))
            counts = (full[todo] == self.image_token).sum(dim=1).tolist()
            for row, part in zip(todo, flat.split(counts), strict=True):
                found[digests[row]] = part
                self._store(digests[row], part)
            self.counts["vision_runs"] += len(todo)
        return [found[d] for d in digests]

    def _lookup(self, digest: str) -> torch.Tensor | None:
        if self._pinned is not None and self._pinned[0] == digest:
            return self._pinned[1]
        found = self._vision.get(digest)
        if found is not None:
            self._vision.move_to_end(digest)
        return found

    def _store(self, digest: str, features: torch.Tensor) -> None:
        if self._pinned is None:
            self._pinned = (digest, features)
            return
        self._vision[digest] = features
        while len(self._vision) > VISION_ENTRIES:
            self._vision.popitem(last=False)

    def _encoder_outputs(self, features: list[torch.Tensor]) -> dict[str, Any]:
        return encoder_outputs(self.model_type, features)

    def _pixels_of(self, extra: dict[str, torch.Tensor], todo: list[int], count: int
                   ) -> dict[str, torch.Tensor]:
        """The pixel tensors of rows ``todo`` (in that order) as one batch: the batch's
        own tensors when that is every row, else those rows picked out."""
        if todo == list(range(count)):
            return {k: extra[k] for k in (*PIXEL_KEYS, "image_grid_thw") if k in extra}
        if "image_grid_thw" in extra:
            rows = self._pixel_rows(extra, count)
            return {k: torch.cat([rows[i][k] for i in todo]) for k in rows[todo[0]]}
        index = torch.tensor(todo, device=extra["pixel_values"].device)
        return {k: extra[k][index] for k in PIXEL_KEYS if k in extra}

    def _pixel_rows(self, extra: dict[str, torch.Tensor], count: int
                    ) -> list[dict[str, torch.Tensor]]:
        """Each row's own pixel tensors (batch 1), as the family's vision tower takes them."""
        if "image_grid_thw" in extra:  # Qwen2-VL: flattened patches, one image per row
            grid = extra["image_grid_thw"]
            chunks = torch.split(extra["pixel_values"], grid.prod(dim=-1).tolist())
            return [{"pixel_values": chunks[i], "image_grid_thw": grid[i:i + 1]}
                    for i in range(count)]
        return [{k: extra[k][i:i + 1] for k in PIXEL_KEYS if k in extra} for i in range(count)]


def encoder_outputs(model_type: str, features: list[torch.Tensor]) -> dict[str, Any]:
    """``mm_encoder_outputs`` for the base model's forward: each row's image features
    ``[n, H]`` (PaliGemma takes them concatenated, the others as a list)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled: Any = torch.cat(features) if model_type == "paligemma" else list(features)
    return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}


def expanded(cache: Any, count: int, length: int | None = None) -> Any:
    """A shallow copy of a batch-1 ``DynamicCache`` whose keys and values (the first
    ``length`` positions; None: all) are expanded (views, no copy) over ``count`` rows;
    the original is left as it is (``update`` concatenates into new tensors)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        new.keys = layer.keys[:, :, :length].expand(count, -1, -1, -1)
        new.values = layer.values[:, :, :length].expand(count, -1, -1, -1)
        out.layers.append(new)
    return out


def _digest(row: dict[str, torch.Tensor]) -> str:
    """SHA-1 of one row's pixel tensors (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha1()
    for key in sorted(row):
        tensor = row[key].detach().contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()
