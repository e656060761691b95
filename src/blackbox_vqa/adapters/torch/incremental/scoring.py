"""Incremental scoring for :class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`.

:class:`TorchIncremental` groups a batch of perturbations of one original input into
image perturbations (same question) and word perturbations (same image), scores them
with :class:`~blackbox_vqa.adapters.torch.incremental.engine.IncrementalEngine`, and falls back
to the adapter's plain forward pass -- saying why -- when the module cannot be traced,
carries hooks, or fails the self-check: for every new original input the first image
perturbation is also scored the plain way, and the word path reproduces the original's
own logits from two copies of its question; both must agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.adapters.incremental import (
    IncrementalMode,
    IncrementalScores,
    parse_incremental,
)
from blackbox_vqa.adapters.torch.forward import eval_mode, scores_from_logits
from blackbox_vqa.adapters.torch.incremental.engine import (
    DEFAULT_THRESHOLD,
    EngineUnsupported,
    IncrementalEngine,
    OriginalRun,
    iter_hooked,
)
from blackbox_vqa.errors import BlackboxVQAError, InputError
from blackbox_vqa.images import to_rgb_array

__all__ = ["SELF_CHECK_TOLERANCE", "TorchIncremental"]

# Largest |incremental - plain| logit difference the self-check accepts, relative to the
# larger of 1 and the original logits' range (float reassociation is far below it).
SELF_CHECK_TOLERANCE = 1e-4


class ModuleAdapter(Protocol):
    """What the incremental path needs of :class:`~blackbox_vqa.adapters.torch.module.TorchAdapter`
    (a protocol, so that this module does not import the adapter that imports it)."""

    module: torch.nn.Module

    @property
    def output(self) -> str: ...

    def tokens(self, question: str) -> list[int]: ...

    def inputs(
        self, images: Sequence[Any], questions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def logits(self, image_tensor: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...

    def answer_probs_batch(
        self, images: Sequence[Any], questions: Sequence[str]
    ) -> NDArray[np.float64]: ...


class TorchIncremental:
    """The incremental path of one adapter: its engine (traced lazily), the last original
    input's cached run, and why the plain path runs, if it does.

    Args:
        mode: ``"exact"`` or ``"off"``.
        threshold: share of a feature map past which a box is computed in full.
    """

    def __init__(self, mode: str = "exact", *, threshold: float = DEFAULT_THRESHOLD) -> None:
        text = parse_incremental(mode)
        if text not in ("exact", "off"):
            raise InputError(
                f"an adapter's incremental must be exact or off, got {mode!r} (approx is an "
                "option of the occlusion explainer)"
            )
        self.mode: IncrementalMode = text  # type: ignore[assignment]
        if not 0.0 < threshold <= 1.0:
            raise InputError(f"incremental threshold must be in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self._engine: IncrementalEngine | None = None
        self._unsupported = ""
        self._run: OriginalRun | None = None

    def forget(self) -> None:
        """Drop the cached original input (the next call recomputes and re-checks it)."""
        self._run = None

    def reason_off(self, adapter: ModuleAdapter) -> str:
        """Why the plain path must run for ``adapter`` (empty when the incremental may)."""
        if self.mode == "off":
            return "incremental scoring turned off"
        if self._unsupported:
            return self._unsupported
        hooked = list(iter_hooked(adapter.module))
        if hooked or _global_hooks():
            where = ", ".join(hooked[:3]) or "global module hooks"
            return f"the module carries forward hooks ({where}); the plain path runs them"
        return ""

    def scores(
        self,
        adapter: ModuleAdapter,
        image: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
        *,
        tau: float | None = None,
    ) -> IncrementalScores:
        """See :class:`~blackbox_vqa.adapters.incremental.IncrementalScoring`; with
        ``tau``, :class:`~blackbox_vqa.adapters.incremental.ApproximateScoring`."""
        if tau is not None and not (isinstance(tau, float | int) and 0.0 < tau <= 1.0):
            raise InputError(f"tau must be in (0, 1], got {tau!r}")
        if len(images) != len(questions):
            raise InputError(
                f"got {len(images)} images but {len(questions)} questions; they must pair up"
            )
        original = to_rgb_array(image)
        question = str(question)
        reason = self.reason_off(adapter)
        if not reason:
            with eval_mode(adapter.module), torch.inference_mode():
                try:
                    return self._incremental(adapter, original, question, images, questions,
                                             tau)
                except EngineUnsupported as exc:
                    self._unsupported = str(exc)
                    reason = self._unsupported
                except BlackboxVQAError:
                    raise
                except Exception as exc:  # the plain path reports the model's own errors
                    self._unsupported = (
                        f"incremental path failed ({type(exc).__name__}: {exc})"
                    )
                    reason = self._unsupported
        plain = adapter.answer_probs_batch([original, *images], [question, *questions])
        return IncrementalScores(plain[0], plain[1:], "off", reason)

    def _engine_for(self, adapter: ModuleAdapter) -> IncrementalEngine:
        if self._engine is None:
            self._engine = IncrementalEngine(adapter.module, threshold=self.threshold)
        return self._engine

    def _incremental(
        self,
        adapter: ModuleAdapter,
        original: NDArray[Any],
        question: str,
        images: Sequence[NDArray[Any]],
        questions: Sequence[str],
        tau: float | None = None,
    ) -> IncrementalScores:
        engine = self._engine_for(adapter)
        x0, t0 = adapter.inputs([original], [question])
        run = self._run
        fresh = run is None or not (torch.equal(run.image, x0) and torch.equal(run.tokens, t0))
        if fresh:
            self._run = None
            run = engine.original(x0, t0)
            self._run = run
        assert run is not None
        base_tokens = adapter.tokens(question)
        image_items: list[int] = []
        word_items: list[int] = []
        plain_items: list[int] = []
        for i, (img, q) in enumerate(zip(images, questions, strict=True)):
            same_image = img is image_like(img, original)
            same_question = adapter.tokens(str(q)) == base_tokens
            if same_question:
                image_items.append(i)
            elif same_image:
                word_items.append(i)
            else:
                plain_items.append(i)
        logits = torch.empty((len(images), run.logits.shape[1]), dtype=run.logits.dtype)
        if image_items:
            x, _ = adapter.inputs([to_rgb_array(images[i]) for i in image_items], [question])
            logits[image_items] = engine.image_logits(run, x, tau=tau).to(logits.dtype)
            stats = dict(engine.stats)
            if tau is not None and fresh:
                # the self-check compares the exact path with the plain one
                exact = engine.image_logits(run, x[:1]).to(logits.dtype)
                check = logits.clone()
                check[image_items[:1]] = exact
        if word_items:
            _, tokens = adapter.inputs([original], [str(questions[i]) for i in word_items])
            logits[word_items] = engine.word_logits(run, tokens).to(logits.dtype)
        if plain_items:
            x, t = adapter.inputs([to_rgb_array(images[i]) for i in plain_items],
                                  [str(questions[i]) for i in plain_items])
            logits[plain_items] = adapter.logits(x, t).to(logits.dtype)
        if fresh:
            checked = check if tau is not None and image_items else logits
            self._self_check(adapter, engine, checked, run, images, questions,
                             image_items[:1], bool(word_items))
        scores = _scores(adapter, torch.cat([run.logits, logits]))
        kind = "exact" if tau is None or not image_items else f"approximate (tau {tau:g})"
        note = (
            f"{kind} incremental: question branch once for image perturbations, image branch "
            "once for word perturbations"
        )
        if image_items:
            note += (f"; {stats['patched']} image operators on patches, "
                     f"{stats['full']} on full tensors")
            if tau is not None:
                note += f", {stats['truncated']} box truncations"
                if stats.get("kept_full"):
                    note += (f", {stats['kept_full']} layers on whole maps with the cut "
                             "re-applied")
        mode: IncrementalMode = "approx" if tau is not None and image_items else "exact"
        return IncrementalScores(scores[0], scores[1:], mode, note)

    def _self_check(
        self, adapter: ModuleAdapter, engine: IncrementalEngine, logits: torch.Tensor,
        run: OriginalRun, images: Sequence[NDArray[Any]], questions: Sequence[str],
        items: list[int], words: bool,
    ) -> None:
        """Image perturbation ``items`` scored the plain way must match ``logits``; with
        ``words``, the word path on two copies of the original question must reproduce the
        original's logits (that path reuses the image branch; no extra image forward)."""
        diffs = [0.0]
        if items:
            x, t = adapter.inputs([to_rgb_array(images[i]) for i in items],
                                  [str(questions[i]) for i in items])
            plain = adapter.logits(x, t).to(logits.dtype)
            diffs.append(float((plain - logits[items]).abs().max()))
        if words:
            again = engine.word_logits(run, run.tokens.expand(2, -1)).to(logits.dtype)
            diffs.append(float((again - run.logits.to(logits.dtype)).abs().max()))
        scale = max(1.0, float(run.logits.max() - run.logits.min()))
        diff = max(diffs)
        if not diff <= SELF_CHECK_TOLERANCE * scale:
            self._run = None
            raise EngineUnsupported(
                f"self-check failed: incremental logits differ from the plain pass by {diff:.3g}"
            )


def image_like(image: NDArray[Any], original: NDArray[Any]) -> NDArray[Any] | None:
    """``image`` itself when it equals ``original`` (same object or same pixels), else
    ``None``."""
    if image is original:
        return image
    array = to_rgb_array(image)
    if array.shape == original.shape and np.array_equal(array, original):
        return image
    return None


def _scores(adapter: ModuleAdapter, logits: torch.Tensor) -> NDArray[np.float64]:
    return scores_from_logits(logits, adapter.output).double().cpu().numpy()


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_impl

    return bool(module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks)
