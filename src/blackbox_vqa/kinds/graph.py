"""``PATH.pt2`` / ``.ts`` / ``.torchscript``: a PyTorch graph exported by ``bbvqa export``."""

from __future__ import annotations

from blackbox_vqa.kinds.common import THREADS
from blackbox_vqa.specs import GRAPH_SUFFIXES, ModelKind, ModelOptions

__all__ = ["KIND"]


def _load(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.torch.graph import GraphAdapter

    return GraphAdapter(spec.strip())


KIND = ModelKind(
    name="graph", syntax="PATH.pt2/.ts (exported graph)", audience="exported graph",
    matches=lambda spec: spec.lower().endswith(GRAPH_SUFFIXES), load=_load,
    options=(THREADS,), adapters=("blackbox_vqa.adapters.torch.graph",))
