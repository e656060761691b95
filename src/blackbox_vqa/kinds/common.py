"""Options more than one kind reads: declared here once, listed by each kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blackbox_vqa.errors import InputError
from blackbox_vqa.specs import KindOption

__all__ = ["ANSWERS", "MAX_TOKENS", "PROMPT", "REMOTE_MODEL", "THREADS", "TRUST_REMOTE_CODE"]


def _threads(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"--threads must be >= 1, got {value}")


ANSWERS = KindOption(
    "answers_file", Path, flag="answers",
    help="ONNX file without metadata: its answers; hf: BLIP's candidate answers (one per "
    "line, or a JSON list).")

THREADS = KindOption(
    "threads", int, check=_threads, audience="models that run here",
    help="CPU threads of a model that runs here (torch threads; ONNX Runtime intra-op "
    "threads; default: the library's own).")

# Options of generative models (chat endpoints today): any kind that generates lists them.
REMOTE_MODEL = KindOption(
    "remote_model", str,
    help="--http-format openai: the endpoint's model name (default: the only one it lists).")

def _prompt(value: Any) -> None:
    from blackbox_vqa.adapters.hf.prompts import check_template

    check_template(str(value))


def _max_tokens(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"--max-tokens must be an integer >= 1, got {value}")


PROMPT = KindOption(
    "prompt", str, check=_prompt,
    help="Generative models: prompt template with {question} (openai endpoints' default: "
    "the question and 'Answer the question with a single word or number.'; hf: the "
    "question).")

MAX_TOKENS = KindOption("max_tokens", int, check=_max_tokens,
                        help="Generative models: most tokens generated (default 8).")

TRUST_REMOTE_CODE = KindOption(
    "trust_remote_code", bool, audience="hf:",
    help="hf: load a model whose code lives in its folder (runs that code; refused "
    "without this flag).")
