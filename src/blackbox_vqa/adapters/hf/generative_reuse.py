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
- **prefix**: the language model's key/value cache (``DynamicCache``, batch 1) of whole
  rows already run: the first (lead) row of each reused group (its keys and values out of
  the batched pass that ran it anyway), and the row of a one-row batch (the explained
  input, which :func:`~blackbox_vqa.explain.explain` scores first). A group of rows that
  shares a token prefix with a kept row runs only its differing suffixes and the answer
  on a view of that cache (no separate prefix pass). Rows sharing one image (word drops)
  share everything before the first changed question token, image tokens included; rows
  with different images (image occlusion) share the text before the first image token.
  ``PREFIX_ENTRIES`` caches at most, LRU.

Whether a group's prefix reuse pays is decided per batch (:func:`reuse_pays`): the
multiply-adds it saves (rows on the cached prefix x prefix tokens x the language model's
parameters per token) against the cost of the extra forward call it adds (a fixed
``CALL_MACS`` plus ``CALL_TOKENS`` tokens' worth). On tiny models the call costs more
than the tokens: the batch then runs as one pass (the vision output is still reused).

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
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CALL_MACS", "CALL_TOKENS", "FAMILIES", "PREFIX_ENTRIES", "VISION_ENTRIES", "Reuse",
           "encoder_outputs", "expanded", "reuse_pays"]

#: model_type -> whether the prompt prefix's key/value cache may be reused (causal prefix)
FAMILIES = {"llava": True, "qwen2_vl": True, "idefics3": True, "paligemma": False}
PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes")
VISION_ENTRIES = 8
PREFIX_ENTRIES = 4
#: the cost of one more forward call of the language model, in multiply-adds: a fixed
#: part (``CALL_MACS``: Python, masks, kernel launches; a 2-layer, 64-wide Llama's call
#: costs 1.8 ms on this project's CPU however few its tokens, the time of about 2e7 of
#: its multiply-adds in a large batch) plus ``CALL_TOKENS`` tokens' worth (reading every
#: weight once: a one-token call of a 30 x 576 Llama, 1.06e8 multiply-adds a token,
#: costs 57 ms, about 18 tokens' time in a large batch); one thread, see
#: benchmarks/BENCHMARKS.md ("Cutting the overhead, second round")
CALL_MACS = 2e7
CALL_TOKENS = 16


def reuse_pays(rows: int, prefix: int, token_macs: float, extra_calls: int) -> bool:
    """Whether running ``rows`` rows on a cached ``prefix``-token prefix pays: the
    multiply-adds saved, ``rows * prefix * token_macs`` (``token_macs``: the language
    model's parameters outside its embeddings), at least ``extra_calls`` times a call's
    cost, ``CALL_MACS + CALL_TOKENS * token_macs``, and at least one call's cost even
    where no call is added (the cached pass concatenates the cache's keys and values
    with the rows' own in every layer: a prefix of a few tokens is not worth it)."""
    saved = rows * prefix * token_macs
    call = CALL_MACS + CALL_TOKENS * token_macs
    return prefix > 0 and rows > 0 and saved >= max(extra_calls, 1) * call


@dataclass(frozen=True)
class _Pass:
    """One forward call: ``rows`` of the batch, whole (``prefix == 0``) or after their
    first ``prefix`` tokens (read from a kept cache); ``keep``: rows whose caches to keep."""

    rows: tuple[int, ...]
    prefix: int = 0
    keep: tuple[int, ...] = ()


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
        self._token_macs: float | None = None
        #: vision rows run / found; language-model passes; caches kept / read
        self.counts = {"vision_runs": 0, "vision_hits": 0, "passes": 0, "prefix_kept": 0,
                       "prefix_hits": 0}

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
        passes = self._plan(full, mask, digests)
        self.counts["passes"] += len(passes)
        if len(passes) == 1 and not passes[0].prefix:  # the whole batch: no picking of rows
            hidden = self._run(passes[0], full, mask, extra, features, digests, rope)
            self._trim()
            return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        parts = []
        for step in passes:
            index = torch.tensor(step.rows, device=full.device)
            hidden = self._run(step, full, mask, extra, features, digests, rope)
            parts.append((index, hidden.gather(1, (positions[index] - step.prefix)[
                ..., None].expand(-1, -1, hidden.shape[-1]))))
        self._trim()
        out = parts[0][1].new_zeros((count, *parts[0][1].shape[1:]))
        for index, found in parts:
            out[index] = found
        return out

    def _groups(self, digests: list[str]) -> list[tuple[list[int], bool]]:
        """Rows grouped by the prefix they may share: ``(rows, share one image)``. Rows
        sharing an image with another row form a group; all the others form one more."""
        by_image: dict[str, list[int]] = {}
        for row, digest in enumerate(digests):
            by_image.setdefault(digest, []).append(row)
        groups = [(rows, True) for rows in by_image.values() if len(rows) > 1]
        rest = [rows[0] for rows in by_image.values() if len(rows) == 1]
        if rest:
            groups.append((rest, False))
        return groups

    def _plan(self, full: torch.Tensor, mask: torch.Tensor, digests: list[str]
              ) -> list[_Pass]:
        """The forward calls of one batch: first one pass over every row that is not
        reused (each reused group's lead row among them, its cache kept), then one pass
        per reused group over its rows' suffixes. A group is reused where
        :func:`reuse_pays`: the suffix pass is an extra call unless a kept cache covers
        the group's prefix and the group is the whole batch."""
        count = full.shape[0]
        every = tuple(range(count))
        if not self.prefix_kv or not self.full_attention_cache():
            return [_Pass(every)]
        whole: list[int] = []
        keep: list[int] = []
        suffixes: list[_Pass] = []
        for rows, shared in self._groups(digests):
            index = torch.tensor(rows, device=full.device)
            size = self._prefix_length(full[index], mask[index], shared_image=shared)
            covered = size > 0 and self._covering(full[rows[0], :size], digests[rows[0]])
            lead = [] if covered else rows[:1]
            on_cache = rows[len(lead):]
            extra_calls = 0 if covered and len(rows) == count else 1
            if size and len(rows) > 1 and reuse_pays(len(on_cache), size, self.token_macs,
                                                     extra_calls):
                whole.extend(lead)
                keep.extend(lead)
                suffixes.append(_Pass(tuple(on_cache), size))
            else:
                whole.extend(rows)
        if count == 1:  # the explained input, scored alone first: keep its cache
            keep = [0]
        head = [_Pass(tuple(sorted(whole)), 0, tuple(keep))] if whole else []
        return head + suffixes

    def _run(self, step: _Pass, full: torch.Tensor, mask: torch.Tensor,
             extra: dict[str, torch.Tensor], features: list[torch.Tensor],
             digests: list[str], rope: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states ``[R, T - prefix, H]`` of one pass (see :class:`_Pass`)."""
        base = self.model.model
        rows = list(step.rows)
        picked = len(rows) < full.shape[0]
        index = torch.tensor(rows, device=full.device)
        ids, row_mask = (full[index], mask[index]) if picked else (full, mask)
        kwargs: dict[str, Any] = {k: (v[index] if picked else v) for k, v in extra.items()
                                  if k in ("token_type_ids",) and v.dim() == 2}
        if rope is not None:
            kwargs["position_ids"] = (rope[:, index] if picked else rope)[:, :, step.prefix:]
        size = step.prefix
        if size:
            key = self._covering(ids[0, :size], digests[rows[0]])
            if key is None:  # planned: a lead row's cache was kept, or one covered it
                raise LookupError("no kept cache covers the planned prefix")
            images = int((ids[0, :size] == self.image_token).sum())
            kwargs["cache"] = expanded(self._prefixes[key], len(rows), size)
            self.counts["prefix_hits"] += 1
            parts = [features[r][images:] for r in rows]
        else:
            parts = [features[r] for r in rows]
        if sum(int(f.shape[0]) for f in parts):
            kwargs["mm_encoder_outputs"] = self._encoder_outputs(parts)
        out = base(input_ids=ids[:, size:], attention_mask=row_mask, use_cache=bool(
            size or step.keep), **kwargs)
        if step.keep:
            self._keep(out.cache, [rows.index(r) for r in step.keep], ids,
                       row_mask, [digests[r] for r in step.keep])
        return out.last_hidden_state  # type: ignore[no-any-return]

    def _prefix_length(self, ids: torch.Tensor, mask: torch.Tensor, *, shared_image: bool
                       ) -> int:
        """Tokens every row shares (at most each row's prompt length minus one: the last
        prompt token's state is needed); before the first image token unless the rows
        share their image."""
        same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)
        size = min(int(same.sum()), int(mask.sum(dim=1).min()) - 1)
        if not shared_image:
            images = (ids[0, :max(size, 0)] == self.image_token).nonzero()
            if images.numel():
                size = int(images[0, 0])
        return max(size, 0)

    @property
    def token_macs(self) -> float:
        """Multiply-adds per token of the language model: its parameters outside the
        embeddings (the vocabulary projection runs at the answer positions alone)."""
        if self._token_macs is None:
            base = self.model.model
            decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
            self._token_macs = float(sum(p.numel() for name, p in decoder.named_parameters()
                                         if "embed" not in name))
        return self._token_macs

    def full_attention_cache(self) -> bool:
        """Whether the model's ``DynamicCache`` holds plain full-attention layers only
        (sliding-window or other layers: no prefix reuse, the plain pass instead)."""
        if self._layers_ok is None:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            layers = DynamicCache(config=self.model.config).layers
            self._layers_ok = bool(layers) and all(type(x) is DynamicLayer for x in layers)
        return self._layers_ok

    def _covering(self, prefix: torch.Tensor, digest: str) -> tuple[Any, ...] | None:
        """The key of a kept cache whose tokens begin with ``prefix`` (and, where the prefix
        holds image tokens, whose row had the image ``digest``); None if there is none."""
        tokens = tuple(prefix.tolist())
        images = self.image_token in tokens
        for key in reversed(self._prefixes):
            kept, kept_digest = key
            if kept[:len(tokens)] == tokens and (not images or kept_digest == digest):
                self._prefixes.move_to_end(key)
                return key  # type: ignore[no-any-return]
        return None

    def _keep(self, cache: Any, rows: list[int], ids: torch.Tensor, mask: torch.Tensor,
              digests: list[str]) -> None:
        """Keep the batch-1 caches of ``rows`` (positions in the pass) of a pass's
        ``cache``: each row's own tokens (its padding left out), copied out of the batch."""
        if cache is None:
            return
        for row, digest in zip(rows, digests, strict=True):
            length = int(mask[row].sum())
            key = (tuple(ids[row, :length].tolist()), digest)
            self._prefixes[key] = expanded(cache, 1, length, row=row, copy_out=True)
            self.counts["prefix_kept"] += 1

    def _trim(self) -> None:
        """Drop the least recently used kept caches beyond ``PREFIX_ENTRIES`` (after a
        batch: the caches its later passes read stay until they ran)."""
        while len(self._prefixes) > PREFIX_ENTRIES:
            self._prefixes.popitem(last=False)

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


def expanded(cache: Any, count: int, length: int | None = None, *, row: int = 0,
             copy_out: bool = False) -> Any:
    """A shallow copy of a ``DynamicCache`` holding row ``row``'s first ``length``
    positions (None: all), expanded (views) over ``count`` rows, or with ``copy_out``
    copied (batch 1, apart from the batch it came from); the original is left as it is
    (``update`` concatenates into new tensors)."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        keys = layer.keys[row:row + 1, :, :length]
        values = layer.values[row:row + 1, :, :length]
        if copy_out:
            new.keys, new.values = keys.clone(), values.clone()
        else:
            new.keys = keys.expand(count, -1, -1, -1)
            new.values = values.expand(count, -1, -1, -1)
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
