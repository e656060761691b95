"""Weight randomisation capability, for model-parameter randomisation sanity checks.

An adapter that can make a copy of its model with some layers re-initialised declares
:class:`SupportsWeightRandomisation`. Layers are the submodules that hold parameters
themselves (convolutions, linear layers, embeddings, LSTMs...), listed output first: in
the reverse of the order the module registers them, which for a sequential network is
the order from the output down (Adebayo et al. 2018's cascading randomisation). The
user's module is never touched: randomisation works on a deep copy, and torch's global
random state is left as it was.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from blackbox_vqa.errors import InputError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SupportsWeightRandomisation", "parameter_layers", "randomised_module"]


@runtime_checkable
class SupportsWeightRandomisation(Protocol):
    """A model that can copy itself with its top ``layers`` layers re-initialised."""

    def randomisable_layers(self) -> list[str]:
        """Names of the layers that can be re-initialised, output first."""
        ...

    def randomised_copy(self, layers: int, seed: int) -> Self:
        """A copy of the model with the first ``layers`` of :meth:`randomisable_layers`
        re-initialised from ``seed``; the model itself is left unchanged."""
        ...


def parameter_layers(module: nn.Module) -> list[str]:
    """Names of the submodules holding parameters of their own, output first (reverse
    registration order)."""
    names = [name for name, sub in module.named_modules()
             if name and any(True for _ in sub.parameters(recurse=False))]
    if any(True for _ in module.parameters(recurse=False)):
        names.insert(0, "")
    return names[::-1]


def _reinitialise(layer: nn.Module, *, root: bool) -> None:
    reset = getattr(layer, "reset_parameters", None)
    if callable(reset) and not root:
        reset()
        return
    with torch.no_grad():
        for parameter in layer.parameters(recurse=False):
            std = float(parameter.detach().float().std()) if parameter.numel() > 1 else 0.0
            nn.init.normal_(parameter, mean=0.0, std=std if std > 0 else 0.01)


def randomised_module(module: nn.Module, layers: int, seed: int) -> nn.Module:
    """A deep copy of ``module`` with its first ``layers`` :func:`parameter_layers`
    re-initialised (``reset_parameters``, else normal with the old values' spread).

    Layer ``j`` gets the same values whatever ``layers >= j`` is (the layers are drawn in
    order from one seeded stream), so the copies form a cascade. Torch's global random
    state is restored afterwards.
    """
    names = parameter_layers(module)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= len(names):
        raise InputError(f"layers must be an int in [0, {len(names)}], got {layers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    clone = copy.deepcopy(module)
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for name in names[:layers]:
            _reinitialise(clone.get_submodule(name) if name else clone, root=not name)
    return clone
