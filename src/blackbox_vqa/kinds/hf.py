"""``hf:PATH_OR_ID``: a Hugging Face ``transformers`` VQA model (a ``save_pretrained`` folder,
or a hub id where the hub is reachable)."""

from __future__ import annotations

from blackbox_vqa.errors import InputError
from blackbox_vqa.kinds.common import ANSWERS, THREADS
from blackbox_vqa.specs import ModelKind, ModelOptions

__all__ = ["KIND"]


def _load(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.hf.vqa import HfAdapter

    name = spec.strip()[3:].strip()
    if not name:
        raise InputError(f"model spec {spec!r} names no model; use hf:PATH_OR_ID")
    return HfAdapter.from_pretrained(name, answers_file=options.extra.get("answers_file"),
                                     device=options.extra.get("device"))


KIND = ModelKind(
    name="hf", syntax="hf:PATH_OR_ID", audience="hf:",
    matches=lambda spec: spec.lower().startswith("hf:"), load=_load,
    options=(ANSWERS, THREADS), adapters=("blackbox_vqa.adapters.hf.vqa",))
