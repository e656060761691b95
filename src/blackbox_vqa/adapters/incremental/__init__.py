"""Incremental scoring of perturbations: the optional adapter capability and its PyTorch
engine (exact Krypton-style incremental inference plus branch caching).

:class:`IncrementalScoring` is the capability an explainer checks with ``isinstance``;
:class:`~blackbox_vqa.adapters.incremental.engine.IncrementalEngine` computes, for a
traced ``nn.Module``, the same logits as the plain forward pass over perturbed inputs
while recomputing only what each perturbation changes.
"""

from __future__ import annotations

from blackbox_vqa.adapters.incremental.protocol import (
    INCREMENTAL_MODES,
    IncrementalScores,
    IncrementalScoring,
    parse_incremental,
)

__all__ = ["INCREMENTAL_MODES", "IncrementalScores", "IncrementalScoring", "parse_incremental"]
