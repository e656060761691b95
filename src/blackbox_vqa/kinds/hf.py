"""``hf:PATH_OR_ID``: a Hugging Face ``transformers`` VQA model (a ``save_pretrained`` folder,
or a hub id where the hub is reachable)."""

from __future__ import annotations

from blackbox_vqa.errors import InputError
from blackbox_vqa.kinds.common import ANSWERS, MAX_TOKENS, PROMPT, THREADS, TRUST_REMOTE_CODE
from blackbox_vqa.specs import ModelKind, ModelOptions

__all__ = ["KIND"]


def _load(spec: str, options: ModelOptions) -> object:
    from blackbox_vqa.adapters.hf.vqa import HfAdapter

    name = spec.strip()[3:].strip()
    if not name:
        raise InputError(f"model spec {spec!r} names no model; use hf:PATH_OR_ID")
    if _is_generative_folder(name):
        from blackbox_vqa.adapters.hf.generative import GenerativeAdapter

        extra = {k: options.extra[k] for k in ("prompt", "max_tokens", "device")
                 if options.extra.get(k) is not None}
        return GenerativeAdapter.from_pretrained(
            name, answers_file=options.extra.get("answers_file"),
            trust_remote_code=bool(options.extra.get("trust_remote_code")), **extra)
    # --prompt and --max-tokens are for generative folders; a classifier ignores them
    # (compare passes them to every hf: model of a run)
    return HfAdapter.from_pretrained(name, answers_file=options.extra.get("answers_file"),
                                     device=options.extra.get("device"))


def _is_generative_folder(location: str) -> bool:
    """Whether a local folder's config.json names a generative image-text-to-text
    architecture or code of its own (read as JSON: no code runs)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    try:
        config = json.loads((Path(location).expanduser() / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if config.get("auto_map"):  # remote code: the generative loader refuses it unless trusted
        return True
    from blackbox_vqa.adapters.hf.generative import is_generative_vlm

    return is_generative_vlm(SimpleNamespace(**config))


KIND = ModelKind(
    name="hf", syntax="hf:PATH_OR_ID", audience="hf:",
    matches=lambda spec: spec.lower().startswith("hf:"), load=_load,
    options=(ANSWERS, PROMPT, MAX_TOKENS, TRUST_REMOTE_CODE, THREADS),
    adapters=("blackbox_vqa.adapters.hf.vqa", "blackbox_vqa.adapters.hf.generative"))
