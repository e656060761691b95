"""Whole-answer likelihood at a chat endpoint: the ``sequence`` score kind.

The answer the model generated for the original input is sent back as a *continued
assistant message* (``continue_final_message: true``, ``add_generation_prompt: false``)
with ``prompt_logprobs: 0``, as vLLM accepts: the server then returns the log-probability
of every prompt token given the ones before it. The answer's tokens are the last prompt
tokens, found by joining their decoded text from the end until it spells the answer; the
score is ``exp`` of the sum of their log-probabilities: the exact probability that the
model generates this answer for this input (up to the server's floating point).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from blackbox_vqa.adapters.http.formats import (
    JSON_CONTENT_TYPE,
    OTHER_ANSWER,
    Item,
    WireError,
    load_json,
)
from blackbox_vqa.adapters.http.openai import ChatFormat

__all__ = ["SequenceFormat", "SequenceScore", "answer_logprob", "sequence_semantics"]


@dataclass(frozen=True)
class SequenceScore:
    """The log-probability of the whole answer for one input (``<= 0``, may be ``-inf``)."""

    logprob: float

    @property
    def probability(self) -> float:
        """``exp(logprob)`` in ``[0, 1]``."""
        return math.exp(self.logprob) if self.logprob > -math.inf else 0.0


def _entry_logprob(entry: object, token_id: object, where: str) -> tuple[float, str]:
    """``(logprob, decoded token)`` of the prompt token at one ``prompt_logprobs`` position."""
    if not isinstance(entry, dict) or not entry:
        raise WireError(f"{where} is not an object of token ids")
    key = str(token_id) if token_id is not None else None
    if key is None or key not in entry:
        if len(entry) != 1:
            raise WireError(f"{where} lists {len(entry)} tokens and the answer carries no "
                            "prompt_token_ids to tell which one is the prompt's")
        key = next(iter(entry))
    found = entry[key]
    decoded = found.get("decoded_token") if isinstance(found, dict) else None
    value = found.get("logprob") if isinstance(found, dict) else None
    if not isinstance(decoded, str):
        raise WireError(f"{where} has no 'decoded_token' string")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{where} has a logprob that is not a number: {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = -math.inf if value < 0 else math.inf
    if math.isnan(number) or number > 1e-6:
        raise WireError(f"{where} has a logprob that is not a number <= 0: {value!r}")
    return min(number, 0.0), decoded


def answer_logprob(data: Any, answer: str) -> float:
    """The summed log-probability of the last prompt tokens that spell ``answer`` (or,
    when a chat template trimmed it, ``answer.strip()``), from a vLLM-shaped body."""
    if not isinstance(data, dict) or not isinstance(data.get("prompt_logprobs"), list):
        raise WireError("answered without a 'prompt_logprobs' list (the server cannot "
                        "score a given answer)")
    entries = data["prompt_logprobs"]
    ids = data.get("prompt_token_ids")
    ids = ids if isinstance(ids, list) and len(ids) == len(entries) else [None] * len(entries)
    for target in dict.fromkeys((answer, answer.strip())):
        text, total = "", 0.0
        for i in range(len(entries) - 1, 0, -1):
            if entries[i] is None:
                break
            logprob, decoded = _entry_logprob(entries[i], ids[i], f"prompt_logprobs[{i}]")
            text, total = decoded + text, total + logprob
            if target and (text == target or (text.lstrip() == target.lstrip()
                                              and not text[:len(text) - len(target)].strip()
                                              and len(text) >= len(target))):
                return total  # a template may put a space before the message
            if len(text) >= len(target) or not target.endswith(text.lstrip()):
                break
    raise WireError("answered with prompt tokens that do not end in the answer's text "
                    "(its chat template may change the assistant message)")


@dataclass(frozen=True)
class SequenceFormat:
    """Score one given answer per request: the chat request of :class:`ChatFormat` with the
    answer as a continued assistant message, one token generated, ``prompt_logprobs: 0``."""

    chat: ChatFormat
    answer: str
    name: str = "openai"

    def request(self, image: Any, question: str) -> dict[str, Any]:
        """The request object for one input."""
        payload: dict[str, Any] = {
            "model": self.chat.remote_model,
            "messages": [self.chat.user_message(image, question),
                         {"role": "assistant", "content": self.answer}],
            self.chat.token_parameter: 1,
            "prompt_logprobs": 0,
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
        if self.chat.temperature:
            payload["temperature"] = 0
        if self.chat.seed is not None:
            payload["seed"] = self.chat.seed
        return payload

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body and its content type."""
        (image, question), = items
        return json.dumps(self.request(image, question)).encode("utf-8"), JSON_CONTENT_TYPE

    def parse(self, content: bytes, content_type: str, n: int) -> list[SequenceScore]:
        """Read one scoring answer (``n`` is 1)."""
        data = load_json(content)
        if isinstance(data, dict) and "error" in data:
            raise WireError("answered with an error instead of prompt_logprobs")
        return [SequenceScore(answer_logprob(data, self.answer))]

    def with_chat(self, chat: ChatFormat) -> SequenceFormat:
        """The same answer scored with other chat settings."""
        return replace(self, chat=chat)


def sequence_semantics() -> dict[str, Any]:
    """``score_semantics`` of whole-answer scores."""
    return {
        "kind": "sequence",
        "format": "openai",
        "scores": "exact",
        "maps": "exact",
        "other_answer": OTHER_ANSWER,
        "note": "The answer's score is the probability of the whole generated text: exp of "
        "the sum of its tokens' log-probabilities, read through prompt_logprobs with the "
        "answer as a continued assistant message. Only the answer generated for the original "
        "input is scored: '(other)' scores 0, and no perturbation flips the answer.",
    }
