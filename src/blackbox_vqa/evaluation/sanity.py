"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps").

The model's layers are re-initialised cumulatively from the output down (on copies: the
user's model is never changed), the map is recomputed after each layer, and compared
with the original map: Spearman's rank correlation and SSIM of ``|map|``. A map that
explains the *model* must change once the weights it was computed from are gone; a map
that stays put is explaining the image (an edge detector does that).

**Passing.** A method passes when, with every layer randomised, the rank correlation of
``|map|`` with the original falls below ``threshold`` (default 0.5: the two rankings
then share under a quarter of their variance, ``rho^2 < 0.25``; Adebayo et al. read a
map whose similarity stays high after cascading randomisation as failing). A constant
map (NaN correlation: nothing left of the original ranking) counts as passing.

**SSIM** (Wang et al. 2004): both ``|map|`` scaled to ``[0, 1]`` by their maximum, local
means, variances and covariance from a Gaussian window (sigma 1.5 pixels, edges
reflected), ``C1 = 0.01^2``, ``C2 = 0.03^2``, averaged over the map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.torch.randomisation import SupportsWeightRandomisation
from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.evaluation.human_attention import spearman

__all__ = [
    "DEFAULT_THRESHOLD",
    "LayerSimilarity",
    "SanityResult",
    "map_similarity",
    "randomisation_test",
    "ssim",
]

DEFAULT_THRESHOLD = 0.5
SSIM_SIGMA = 1.5
_C1 = 0.01**2
_C2 = 0.03**2


def _unit_scale(values: NDArray[Any]) -> NDArray[np.float64]:
    array = np.abs(np.asarray(values, dtype=np.float64))
    top = float(array.max()) if array.size else 0.0
    return array / top if top > 0 else array


def _smooth(values: NDArray[np.float64], sigma: float) -> NDArray[np.float64]:
    """Separable Gaussian smoothing of a 2-D ``float64`` map, edges reflected."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = values
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        out = sum(weight * np.take(padded, np.arange(k, k + n), axis=axis)
                  for k, weight in enumerate(kernel))
    return np.asarray(out, dtype=np.float64)


def ssim(a: NDArray[Any], b: NDArray[Any], *, sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of ``|a|`` and ``|b|`` (2-D, same shape), each scaled to
    ``[0, 1]`` by its maximum; 1.0 for identical maps."""
    x, y = _unit_scale(a), _unit_scale(b)
    if x.ndim != 2 or x.shape != y.shape or x.size == 0:
        raise InputError(f"SSIM needs two 2-D maps of one shape, got {x.shape} and {y.shape}")
    if not sigma > 0:
        raise InputError(f"sigma must be > 0, got {sigma!r}")

    def smooth(values: NDArray[np.float64]) -> NDArray[np.float64]:
        return _smooth(values, sigma)

    mx, my = smooth(x), smooth(y)
    vx = smooth(x * x) - mx * mx
    vy = smooth(y * y) - my * my
    cov = smooth(x * y) - mx * my
    index = ((2 * mx * my + _C1) * (2 * cov + _C2)) / (
        (mx * mx + my * my + _C1) * (vx + vy + _C2))
    return float(index.mean())


def map_similarity(original: NDArray[Any], other: NDArray[Any]) -> tuple[float, float]:
    """``(spearman, ssim)`` of ``|original|`` and ``|other|`` (NaN rank correlation when
    either map is constant)."""
    a = np.abs(np.asarray(original, dtype=np.float64))
    b = np.abs(np.asarray(other, dtype=np.float64))
    if a.shape != b.shape:
        raise InputError(f"maps to compare have shapes {a.shape} and {b.shape}")
    return spearman(a, b), ssim(a, b)


@dataclass(frozen=True)
class LayerSimilarity:
    """The map after randomising the first ``layers`` layers (the last one ``layer``)."""

    layer: str
    layers: int
    spearman: float
    ssim: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        return {"layer": self.layer, "layers": self.layers,
                "spearman": _finite(self.spearman), "ssim": _finite(self.ssim)}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class SanityResult:
    """One randomisation test.

    Attributes:
        method: the method's name (as given).
        steps: one entry per cumulatively randomised layer, output first.
        threshold: the rank correlation a passing method falls below.
        seed: the seed of the re-initialisation.
        evaluations: maps computed (the original and one per step).
    """

    method: str
    steps: tuple[LayerSimilarity, ...]
    threshold: float
    seed: int
    evaluations: int

    @property
    def final_spearman(self) -> float:
        """Rank correlation with every tested layer randomised (NaN if none was)."""
        return self.steps[-1].spearman if self.steps else math.nan

    @property
    def passes(self) -> bool:
        """Whether the final rank correlation is below ``threshold`` (a constant map,
        NaN, passes)."""
        if not self.steps:
            return False
        value = self.final_spearman
        return not math.isfinite(value) or value < self.threshold

    @property
    def first_below(self) -> str | None:
        """The first layer after whose randomisation the correlation is below threshold."""
        for step in self.steps:
            if not math.isfinite(step.spearman) or step.spearman < self.threshold:
                return step.layer
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "method": self.method,
            "threshold": self.threshold,
            "seed": self.seed,
            "passes": self.passes,
            "first_below": self.first_below,
            "final_spearman": _finite(self.final_spearman),
            "steps": [step.to_dict() for step in self.steps],
            "evaluations": self.evaluations,
        }


def randomisation_test(
    model: object,
    explain: Callable[[Any], NDArray[Any]],
    *,
    method: str = "",
    layers: int | None = None,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
) -> SanityResult:
    """Cascading randomisation of ``model``'s layers, output first, comparing maps.

    Args:
        model: a model with :class:`SupportsWeightRandomisation` (e.g. ``TorchAdapter``).
        explain: ``explain(model) -> map``: computes the method's image map (any 2-D
            shape, the same every call) for the input under test on the given model.
        method: a name for the report.
        layers: how many layers to randomise (default: all of them).
        seed: seed of the re-initialisation (one stream, so layer ``j`` gets the same
            weights in every copy).
        threshold: rank correlation a passing method must fall below.
    """
    if not isinstance(model, SupportsWeightRandomisation):
        raise NotSupportedError(
            f"{type(model).__name__} cannot randomise its weights; the sanity check needs a "
            "model with randomised_copy (a PyTorch module behind TorchAdapter)"
        )
    names = model.randomisable_layers()
    count = len(names) if layers is None else layers
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(names):
        raise InputError(f"layers must be an int in [1, {len(names)}], got {layers!r}")
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold must be in (0, 1], got {threshold!r}")
    original = np.asarray(explain(model), dtype=np.float64)
    steps = []
    for k in range(1, count + 1):
        randomised = np.asarray(explain(model.randomised_copy(k, seed)), dtype=np.float64)
        rho, structural = map_similarity(original, randomised)
        steps.append(LayerSimilarity(layer=names[k - 1], layers=k, spearman=rho,
                                     ssim=structural))
    return SanityResult(method=method, steps=tuple(steps), threshold=float(threshold),
                        seed=seed, evaluations=count + 1)
