"""Whole-answer likelihood at a chat endpoint: the ``sequence`` score kind.

The answer the model generated for the original input is sent back as a *continued
assistant message* (``continue_final_message: true``, ``add_generation_prompt: false``)
with ``prompt_logprobs: 0`` and ``return_token_ids: true``, as vLLM accepts: the server
then returns the id and log-probability of every prompt token given the ones before it.
The answer's tokens are the last prompt tokens, found by joining their decoded text from
the end until it spells the answer; the score is ``exp`` of the sum of their
log-probabilities: the exact probability that the model generates *these tokens* (the
answer's text as the server tokenises it inside the continued message) for this input, up
to the server's floating point.

The score is checked once, on the original input, token by token
(:class:`PrefixFormat`): for each answer token ``t_k``, one request whose prompt is the
answer's first ``k`` tokens (the generation prompt for ``k = 0``, else a continued
message), asking the log-probability of ``t_k`` by id at the next position
(``logprob_token_ids``, tokens reported as ``token_id:N``); the prompt ids it reports must
be the scoring request's first ones, and the sum must equal the whole-answer score
(:data:`SAME_LOGPROB`).
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

__all__ = [
    "SAME_LOGPROB",
    "AnswerToken",
    "NextToken",
    "PrefixFormat",
    "SequenceFormat",
    "SequenceScore",
    "answer_logprob",
    "answer_tokens",
    "check_by_token",
    "prefix_text",
    "sequence_semantics",
]

# The whole-answer log-probability and the sum of its per-token ones agree to this much
# (both computed by the server in float32: ~1e-6 apart on vLLM's CPU build).
SAME_LOGPROB = 1e-4


@dataclass(frozen=True)
class AnswerToken:
    """One answer token of a scoring request: its index in the prompt, its id (None when
    the server sent no ids), its decoded text and its log-probability there."""

    position: int
    token_id: int | None
    text: str
    logprob: float


@dataclass(frozen=True)
class SequenceScore:
    """The log-probability of the whole answer for one input (``<= 0``, may be ``-inf``)."""

    logprob: float
    tokens: tuple[AnswerToken, ...] = ()
    prompt_ids: tuple[int, ...] | None = None  # every prompt token id, when sent

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


def answer_tokens(data: Any, answer: str) -> tuple[AnswerToken, ...]:
    """The last prompt tokens that spell ``answer`` (or, when a chat template trimmed it,
    ``answer.strip()``; a template may also put white space before it, inside the first
    token), from a vLLM-shaped body, in prompt order."""
    if not isinstance(data, dict) or not isinstance(data.get("prompt_logprobs"), list):
        raise WireError("answered without a 'prompt_logprobs' list (the server cannot "
                        "score a given answer)")
    entries = data["prompt_logprobs"]
    ids = data.get("prompt_token_ids")
    ids = ids if isinstance(ids, list) and len(ids) == len(entries) else [None] * len(entries)
    for target in dict.fromkeys((answer, answer.strip())):
        text = ""
        found: list[AnswerToken] = []
        for i in range(len(entries) - 1, 0, -1):
            if entries[i] is None:
                break
            logprob, decoded = _entry_logprob(entries[i], ids[i], f"prompt_logprobs[{i}]")
            token_id = ids[i] if isinstance(ids[i], int) else None
            text = decoded + text
            found.insert(0, AnswerToken(i, token_id, decoded, logprob))
            if target and (text == target or (text.lstrip() == target.lstrip()
                                              and not text[:len(text) - len(target)].strip()
                                              and len(text) >= len(target))):
                return tuple(found)  # a template may put a space before the message
            if len(text) >= len(target) or not target.endswith(text.lstrip()):
                break
    raise WireError("answered with prompt tokens that do not end in the answer's text "
                    "(its chat template may change the assistant message)")


def answer_logprob(data: Any, answer: str) -> float:
    """The summed log-probability of :func:`answer_tokens`."""
    return sum(token.logprob for token in answer_tokens(data, answer))


def _prompt_ids(data: dict[str, Any]) -> tuple[int, ...] | None:
    ids = data.get("prompt_token_ids")
    if isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                     for i in ids):
        return tuple(ids)
    return None


def prefix_text(tokens: Sequence[AnswerToken], k: int, answer: str) -> str:
    """The continued message whose prompt ends with the first ``k`` of ``tokens`` (the
    answer's tokens, :func:`answer_tokens` of ``answer``): their text, less what the
    template put before the message (the characters by which the tokens' text is longer
    than the answer, or than the answer stripped where the template trimmed it)."""
    whole = "".join(token.text for token in tokens)
    target = answer if whole.endswith(answer) else answer.strip()
    lead = max(0, len(whole) - len(target))
    return "".join(token.text for token in tokens[:k])[lead:]


@dataclass(frozen=True)
class SequenceFormat:
    """Score one given answer per request: the chat request of :class:`ChatFormat` with the
    answer as a continued assistant message, one token generated, ``prompt_logprobs: 0``."""

    chat: ChatFormat
    answer: str
    name: str = "openai"

    def request(self, image: Any, question: str) -> dict[str, Any]:
        """The request object for one input."""
        messages = [self.chat.user_message(image, question),
                    {"role": "assistant", "content": self.answer}]
        return self.chat.one_token_request(messages, {
            "prompt_logprobs": 0,
            "return_token_ids": True,
            "continue_final_message": True,
            "add_generation_prompt": False,
        })

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body and its content type."""
        (image, question), = items
        return json.dumps(self.request(image, question)).encode("utf-8"), JSON_CONTENT_TYPE

    def parse(self, content: bytes, content_type: str, n: int) -> list[SequenceScore]:
        """Read one scoring answer (``n`` is 1)."""
        data = load_json(content)
        if isinstance(data, dict) and "error" in data:
            raise WireError("answered with an error instead of prompt_logprobs")
        tokens = answer_tokens(data, self.answer)
        return [SequenceScore(sum(t.logprob for t in tokens), tokens, _prompt_ids(data))]

    def with_chat(self, chat: ChatFormat) -> SequenceFormat:
        """The same answer scored with other chat settings."""
        return replace(self, chat=chat)


@dataclass(frozen=True)
class NextToken:
    """One token-by-token answer: the log-probability of the token asked about at the
    first generated position, and the prompt ids the server reports (None: not sent)."""

    logprob: float
    prompt_ids: tuple[int, ...] | None


@dataclass(frozen=True)
class PrefixFormat:
    """Ask the log-probability of token ``token_id`` right after a prompt: the user
    message, then the generation prompt (``prefix`` None) or ``prefix`` as a continued
    assistant message; one token generated, the token asked by id (vLLM's
    ``logprob_token_ids``, ``return_tokens_as_token_ids``, ``return_token_ids``)."""

    chat: ChatFormat
    prefix: str | None
    token_id: int
    name: str = "openai"

    def request(self, image: Any, question: str) -> dict[str, Any]:
        """The request object for one input."""
        messages = [self.chat.user_message(image, question)]
        if self.prefix is not None:
            messages.append({"role": "assistant", "content": self.prefix})
        return self.chat.one_token_request(messages, {
            "logprobs": True,
            "top_logprobs": 0,
            "logprob_token_ids": [self.token_id],
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "continue_final_message": self.prefix is not None,
            "add_generation_prompt": self.prefix is None,
        })

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body and its content type."""
        (image, question), = items
        return json.dumps(self.request(image, question)).encode("utf-8"), JSON_CONTENT_TYPE

    def parse(self, content: bytes, content_type: str, n: int) -> list[NextToken]:
        """Read one answer (``n`` is 1): the token's logprob at the first position."""
        data = load_json(content)
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        content_list = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not isinstance(content_list, list) or not content_list or \
                not isinstance(content_list[0], dict):
            raise WireError("answered a token-by-token request without logprobs")
        first = content_list[0]
        wanted = f"token_id:{self.token_id}"
        listed = [first, *(first.get("top_logprobs") or [])]
        for entry in listed:
            if isinstance(entry, dict) and entry.get("token") == wanted:
                logprob, _ = _entry_logprob({wanted: {"logprob": entry.get("logprob"),
                                                      "decoded_token": wanted}},
                                            wanted, "logprobs position 0")
                return [NextToken(logprob, _prompt_ids(data))]
        raise WireError(f"answered a token-by-token request without token {wanted} "
                        "(logprob_token_ids)")


def check_by_token(score: SequenceScore, found: Sequence[NextToken | None]) -> str | None:
    """None when ``found`` (one answer per token of ``score``; None where no prompt
    reproduced the answer's first tokens) sums to ``score``'s log-probability within
    :data:`SAME_LOGPROB`; else what differs, in words."""
    missing = [k for k, next_token in enumerate(found) if next_token is None]
    if missing or len(found) != len(score.tokens) or not found:
        k = missing[0] if missing else len(found)
        return (f"no prompt reproduces the first {k} of the answer's {len(score.tokens)} "
                "tokens, so its score cannot be checked token by token")
    total = sum(next_token.logprob for next_token in found if next_token is not None)
    if abs(total - score.logprob) > SAME_LOGPROB:
        return (f"the server scores the answer {score.logprob:.6g} as a whole but "
                f"{total:.6g} token by token")
    return None


def sequence_semantics() -> dict[str, Any]:
    """``score_semantics`` of whole-answer scores."""
    return {
        "kind": "sequence",
        "format": "openai",
        "scores": "exact",
        "maps": "exact",
        "other_answer": OTHER_ANSWER,
        "note": "The answer's score is the probability of its whole text: exp of the sum "
        "of the log-probabilities of its tokens as the server tokenises the answer inside a "
        "continued assistant message (read through prompt_logprobs), checked on the original "
        "input against one request per token. Only the answer generated for the original "
        "input is scored: '(other)' scores 0, and no perturbation flips the answer.",
    }
