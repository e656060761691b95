"""The ``openai`` wire format: a vision-language model behind a chat-completions endpoint.

Each input is one ``POST {base}/chat/completions`` (OpenAI, vLLM, TGI, llama.cpp's server,
Ollama...) with one user message: the prompt (the question in a template) and the image as
a ``data:image/png;base64,...`` URL, asked with ``temperature: 0``, ``logprobs: true`` and
``top_logprobs``. The answer is the generated text, normalised as the evaluation normalises
answers (:func:`blackbox_vqa.text.normalise_answer`).

**Scores.** An answer is identified by its *first token*: the score of an answer is the
probability of that token at the first generated position (the first one that is not white
space), read from the position's ``top_logprobs`` list. Tokens are compared after the same
normalisation (``" Yes"`` and ``"yes"`` are one key; the larger probability counts). A token
missing from the list scores 0, so scores are lower bounds. :class:`ChatVocabulary` learns
the answers (columns) from the original input's answer and its first-position alternatives.
A server that returns no logprobs is read as answer-only: the answer scores 1.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.adapters.http.config import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_SEED,
    DEFAULT_TOP_LOGPROBS,
    check_chat_options,
)
from blackbox_vqa.adapters.http.formats import (
    JSON_CONTENT_TYPE,
    OTHER_ANSWER,
    Item,
    WireError,
    load_json,
)
from blackbox_vqa.text import normalise_answer, terminal_safe
from blackbox_vqa.wire import png_bytes

__all__ = [
    "CHAT_PATH",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PROMPT",
    "DEFAULT_SEED",
    "DEFAULT_TOP_LOGPROBS",
    "MODELS_PATH",
    "ChatAnswer",
    "ChatFormat",
    "ChatVocabulary",
    "adapt_to_refusal",
    "chat_semantics",
    "check_chat_options",
    "parse_model_list",
    "render_prompt",
    "token_key",
]

CHAT_PATH = "/chat/completions"
MODELS_PATH = "/models"
_SNIPPET = 120
_LOGPROB_SLACK = 1e-6  # a logprob a hair above 0 is rounding, not an error


def render_prompt(template: str, question: str) -> str:
    """``template`` with every ``{question}`` replaced by ``question`` (other braces kept)."""
    return template.replace("{question}", question)


def token_key(token: str) -> str:
    """What identifies an answer's first token: the token normalised as answers are
    (``" Yes"`` -> ``"yes"``), or the token stripped when that leaves nothing."""
    return normalise_answer(token) or token.strip() or token


@dataclass(frozen=True)
class ChatAnswer:
    """One chat completion, read: ``text`` is the normalised answer; ``first`` pairs each
    key (:func:`token_key`) listed at the first generated position with its probability,
    the generated token's key first; None when the server sent no logprobs. ``raw`` is the
    message content as generated, ``model`` the model id the server reported, and
    ``prompt_logprobs`` whether the answer has vLLM's ``prompt_logprobs`` key (a server
    that can score a given text)."""

    text: str
    first: tuple[tuple[str, float], ...] | None
    raw: str = ""
    model: str | None = None
    prompt_logprobs: bool = False
    total: float | None = None  # sum of the generated tokens' logprobs, when all are listed


@dataclass(frozen=True)
class ChatFormat:
    """``POST {base}/chat/completions``, one input a request."""

    remote_model: str
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = DEFAULT_MAX_TOKENS
    top_logprobs: int = DEFAULT_TOP_LOGPROBS
    seed: int | None = DEFAULT_SEED
    name: str = "openai"
    # What a hosted API may refuse (learned from its 400 answers): the name of the
    # token limit, and whether temperature and logprobs are sent at all.
    token_parameter: str = "max_tokens"
    temperature: bool = True
    logprobs: bool = True

    def user_message(self, image: NDArray[Any], question: str) -> dict[str, Any]:
        """The one user message: the prompt and the image as a PNG data URL."""
        url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
        return {"role": "user", "content": [
            {"type": "text", "text": render_prompt(self.prompt, question)},
            {"type": "image_url", "image_url": {"url": url}},
        ]}

    def request(self, image: NDArray[Any], question: str) -> dict[str, Any]:
        """The request object for one input."""
        payload: dict[str, Any] = {
            "model": self.remote_model,
            "messages": [self.user_message(image, question)],
            self.token_parameter: self.max_tokens,
        }
        if self.temperature:
            payload["temperature"] = 0
        if self.logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = self.top_logprobs
        if self.seed is not None:
            payload["seed"] = self.seed
        return payload

    def one_token_request(self, messages: list[dict[str, Any]],
                          fields: dict[str, Any]) -> dict[str, Any]:
        """A scoring request that generates one token: the model, ``messages``, a token
        limit of 1, ``fields``, then temperature 0 and the seed as :meth:`request` sends
        them."""
        payload: dict[str, Any] = {
            "model": self.remote_model,
            "messages": messages,
            self.token_parameter: 1,
            **fields,
        }
        if self.temperature:
            payload["temperature"] = 0
        if self.seed is not None:
            payload["seed"] = self.seed
        return payload

    def settings(self) -> dict[str, Any]:
        """What determines an answer besides the input, for ``explanation.json``."""
        return {"remote_model": self.remote_model, "prompt": self.prompt,
                "max_tokens": self.max_tokens, "token_parameter": self.token_parameter,
                "seed": self.seed, "temperature": 0 if self.temperature else None,
                "top_logprobs": self.top_logprobs if self.logprobs else None}

    def body(self, items: Sequence[Item]) -> tuple[bytes, str]:
        """The request body and its content type."""
        (image, question), = items
        return json.dumps(self.request(image, question)).encode("utf-8"), JSON_CONTENT_TYPE

    def parse(self, content: bytes, content_type: str, n: int) -> list[ChatAnswer]:
        """Read one chat completion (``n`` is 1)."""
        data = load_json(content)
        if isinstance(data, dict) and "error" in data:
            raise WireError(f"answered with an error: "
                            f"{terminal_safe(str(data['error'])[:_SNIPPET])}")
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise WireError("answered without a 'choices' list")
        choice = choices[0]
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            refusal = message.get("refusal") if isinstance(message, dict) else None
            why = f" (refusal: {str(refusal)[:_SNIPPET]!r})" if refusal else ""
            raise WireError(f"answered without message content{why}")
        answer = normalise_answer(text)
        if not answer:
            raise WireError("answered with an empty answer")
        model = data.get("model")
        return [ChatAnswer(answer, _first_position(choice.get("logprobs"), self.top_logprobs),
                           raw=text, model=model if isinstance(model, str) else None,
                           prompt_logprobs="prompt_logprobs" in data,
                           total=_total(choice.get("logprobs")))]


def _logprob(value: object, where: str) -> float:
    """The probability of a logprob (a huge negative integer is probability 0)."""
    try:
        number = float(value) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond float: -10**400 is -inf, +10**400 is not <= 0
        number = -math.inf if value < 0 else math.inf  # type: ignore[operator]
    if math.isnan(number) or number > _LOGPROB_SLACK:
        raise WireError(f"{where} has a logprob that is not a number <= 0: {value!r}")
    return math.exp(min(number, 0.0))


def _total(logprobs: object) -> float | None:
    """The sum of every generated token's logprob (None when any is missing or odd)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    total = 0.0
    for entry in content:
        value = entry.get("logprob") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            total += float(value)
        except OverflowError:
            return None
    return total if math.isfinite(total) else None


def _first_position(logprobs: object, top: int) -> tuple[tuple[str, float], ...] | None:
    """Key -> probability at the first generated position that is not white space; of its
    ``top_logprobs`` list only the ``top`` entries asked for are read (a server sending
    more would cost time and memory for nothing)."""
    if logprobs is None:
        return None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if content is None:
        return None
    if not isinstance(content, list):
        raise WireError("answered with 'logprobs' whose 'content' is not a list")
    for i, entry in enumerate(content):
        where = f"logprobs position {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            raise WireError(f"{where} has no 'token' string")
        if entry["token"].strip():
            break
    else:
        return None  # nothing but white space was scored
    found: dict[str, float] = {token_key(entry["token"]): _logprob(entry.get("logprob"), where)}
    alternatives = entry.get("top_logprobs") or []
    if not isinstance(alternatives, list):
        raise WireError(f"{where} has a 'top_logprobs' that is not a list")
    for j, alt in enumerate(alternatives[:top]):
        if not isinstance(alt, dict) or not isinstance(alt.get("token"), str):
            raise WireError(f"{where}, top_logprobs entry {j} has no 'token' string")
        key = token_key(alt["token"])
        found[key] = max(found.get(key, 0.0), _logprob(alt.get("logprob"), f"{where}.{j}"))
    return tuple(found.items())


def parse_model_list(content: bytes) -> list[str]:
    """The model ids of a ``GET {base}/models`` answer (``{"data": [{"id": ...}]}``)."""
    data = load_json(content)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise WireError("/models answered without a 'data' list")
    return [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


@dataclass
class ChatVocabulary:
    """The answers (columns) of a chat endpoint, learned from its answers.

    With logprobs, :meth:`learn` adds the answer's text as a column identified by its
    first token's key, then each first-position alternative's key as a column of its own
    (named by the key). Without (``logprobs`` False, fixed by the first answer learned),
    columns are whole normalised answers. Columns never move; :meth:`row` puts everything
    else in one last ``(other)`` column.
    """

    names: list[str] = field(default_factory=list)
    columns: dict[str, int] = field(default_factory=dict)  # first-token key or text -> column
    logprobs: bool | None = None
    named: dict[str, int] = field(default_factory=dict)  # name -> column

    def learn(self, answer: ChatAnswer) -> None:
        """Add the columns ``answer`` brings (none when they are known already)."""
        if self.logprobs is None:
            self.logprobs = answer.first is not None
        if not self.logprobs or answer.first is None:
            self._add(answer.text, answer.text)
            return
        (key, _), *others = answer.first
        self._add(answer.text, key)
        for key, _ in sorted(others, key=lambda pair: -pair[1]):
            self._add(key, key)

    def _add(self, name: str, key: str) -> None:
        if key in self.columns or name == OTHER_ANSWER:
            return
        if name in self.named:  # another token starting the same answer: same column
            self.columns[key] = self.named[name]
            return
        self.columns[key] = self.named[name] = len(self.names)
        self.names.append(name)

    def row(self, answer: ChatAnswer, width: int) -> NDArray[np.float64]:
        """Scores ``[width]``: each listed key's probability in its column, the best of the
        others in the last; without logprobs, 1 in the answer's column."""
        row = np.zeros(width, dtype=np.float64)
        if not self.logprobs:
            row[self.columns.get(answer.text, width - 1)] = 1.0
            return row
        if answer.first is None:
            raise WireError("answered without logprobs, after answering with them "
                            "(the scores of one explanation would not be comparable)")
        for key, probability in answer.first:
            column = self.columns.get(key, width - 1)
            row[column] = max(row[column], probability)
        return row


def chat_semantics(top_logprobs: int, logprobs: bool | None) -> dict[str, Any]:
    """``score_semantics`` of an ``openai`` endpoint (``logprobs`` False: flip maps)."""
    if logprobs is False:
        return {
            "kind": "answer_only",
            "format": "openai",
            "maps": "flip",
            "other_answer": OTHER_ANSWER,
            "note": "The chat endpoint returned no logprobs, so only its answer is known: "
            "the answer scores 1 (every other answer 0), and an importance is 1 where the "
            "perturbation changed the normalised answer text and 0 where it did not: the "
            "maps are flip maps.",
        }
    return {
        "kind": "first_token",
        "format": "openai",
        "top_logprobs": top_logprobs,
        "scores": "lower_bounds",
        "maps": "upper_bounds",
        "other_answer": OTHER_ANSWER,
        "note": "An answer is identified by its first token: its score is the probability "
        "of that token (normalised as answers are) at the first generated position, from "
        "the endpoint's top_logprobs list. A token missing from the list scores 0, so every "
        "score is a lower bound, and an importance p(a|original) - p(a|perturbed) is an "
        "upper bound wherever the token fell out of the list. The answers are the one "
        "generated for the original input and the alternatives to its first token; "
        "'(other)' holds the best score of any other token.",
    }


_CAP_RE = re.compile(r"(?:greater than|more than|at most|max(?:imum)?(?: allowed)?)\D{0,24}?(\d+)",
                     re.IGNORECASE)
_REFUSED_RE = r"(?:unsupported|not supported|unknown|unrecognized|extra)[^.]{0,40}\W{param}\W"


def _refuses(detail: str, param: str) -> bool:
    pattern = _REFUSED_RE.replace("{param}", re.escape(param))
    text = detail.lower()
    return bool(re.search(pattern, text)) or bool(
        re.search(r"\W" + re.escape(param) + r"\W[^.]{0,40}(?:not supported|unsupported|"
                  r"not permitted|not allowed)", text))


def adapt_to_refusal(fmt: ChatFormat, status: int, detail: str) \
        -> tuple[ChatFormat, str] | None:
    """A request the server may take, after it refused ``fmt`` with HTTP ``status`` saying
    ``detail``, and a note saying what changed; None when nothing would help.

    A 400 naming a lower ``top_logprobs`` cap (vLLM: "Requested sample logprobs of 20,
    which is greater than max allowed: 5") asks for that many; a refused ``max_tokens``
    becomes ``max_completion_tokens``; a refused ``temperature`` or ``logprobs`` is left
    out (hosted reasoning models; without logprobs the maps become answer-only).
    """
    if status not in (400, 422):
        return None
    text = detail.lower()
    if fmt.logprobs and "logprob" in text:
        found = _CAP_RE.search(detail)
        cap = int(found.group(1)) if found else None
        if cap is not None and cap < fmt.top_logprobs:
            return (replace(fmt, top_logprobs=cap),
                    f"the server allows at most {cap} top_logprobs: asked for {cap} "
                    f"instead of {fmt.top_logprobs}")
    if fmt.token_parameter == "max_tokens" and "max_completion_tokens" in text \
            and "max_tokens" in text.replace("max_completion_tokens", ""):
        return (replace(fmt, token_parameter="max_completion_tokens"),
                "the server refuses max_tokens: sent max_completion_tokens")
    if fmt.temperature and _refuses(detail, "temperature"):
        return (replace(fmt, temperature=False),
                "the server refuses temperature: sent none (the server's default)")
    if fmt.logprobs and (_refuses(detail, "logprobs") or _refuses(detail, "top_logprobs")):
        return (replace(fmt, logprobs=False),
                "the server refuses logprobs: answer-only")
    return None
