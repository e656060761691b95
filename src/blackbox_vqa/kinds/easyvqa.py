"""``easyvqa``: the built-in reference model, trained on the easy-VQA data set."""

from __future__ import annotations

from blackbox_vqa.kinds.common import THREADS
from blackbox_vqa.specs import ModelKind, ModelOptions

__all__ = ["KIND"]


def _load(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.models.reference import reference_adapter

    return reference_adapter()


KIND = ModelKind(
    name="easyvqa", syntax="easyvqa", audience="easyvqa",
    matches=lambda spec: spec.lower() == "easyvqa", load=_load, options=(THREADS,),
    adapters=("blackbox_vqa.adapters.torch.module",))
