"""``http://host:port[/path]``: a model behind HTTP, in one of the wire formats."""

from __future__ import annotations

from typing import Any

from blackbox_vqa.errors import InputError, NotSupportedError
from blackbox_vqa.kinds.common import MAX_TOKENS, PROMPT, REMOTE_MODEL
from blackbox_vqa.specs import KindOption, ModelKind, ModelOptions

__all__ = ["KIND", "OPTIONS"]


_NO_CACHE = ("off", "none")


def _answer_score(value: Any) -> None:
    from blackbox_vqa.adapters.http.config import SCORES

    if value not in SCORES:
        raise InputError(f"--answer-score must be one of {', '.join(SCORES)}, got {value!r}")


OPTIONS = (
    KindOption("http_format", str,
               help="Wire format of an http:// model: ours, hf (top-k lists), answer-only or "
               "openai (chat completions; default ours)."),
    KindOption("header", list[str],
               help="Extra HTTP header 'Name: value' (repeatable; never printed)."),
    KindOption("http_concurrency", int, help="Most HTTP requests in flight (default 4)."),
    KindOption("http_timeout", float, help="HTTP read timeout, seconds (default 60)."),
    KindOption("http_total_timeout", float,
               help="Most seconds one HTTP request may take in all (default 300)."),
    KindOption("http_max_response_mb", float,
               help="Largest HTTP answer in MiB, after decompression (default 64)."),
    REMOTE_MODEL,
    PROMPT,
    MAX_TOKENS,
    KindOption("top_logprobs", int,
               help="--http-format openai: alternatives asked for at each position (default "
               "20; a server naming a lower cap is asked again with it)."),
    KindOption("answer_score", str, check=_answer_score,
               help="--http-format openai: auto (the whole answer's probability where the "
               "server can score a given text, else its first token's), sequence (an error "
               "where it cannot) or first-token."),
    KindOption("require_logprobs", bool,
               help="--http-format openai: a server answering without logprobs is an error "
               "(exit 1) instead of answer-only flip maps."),
    KindOption("request_cache", str,
               help="Chat requests (--http-format openai): folder keeping every completed "
               "request, reused by a rerun (default for explain: .NAME.requests beside the "
               "output folder, removed once the output is written; 'off': none)."),
)


def _load(spec: str, options: ModelOptions) -> object:
    try:
        from blackbox_vqa.adapters.http.endpoint import HttpAdapter
    except ImportError as exc:
        raise NotSupportedError(f"http:// models need httpx ({exc}); install the extra: "
                                "pip install 'blackbox-vqa[serve]'") from exc
    given = dict(options.extra)
    if "header" in given:
        given["http_headers"] = list(given.pop("header"))
    cache = given.get("request_cache")
    if isinstance(cache, str) and cache.strip().lower() in _NO_CACHE:
        given["request_cache"] = None
    if given.get("http_max_response_mb") is not None:
        given["http_max_response_bytes"] = int(given.pop("http_max_response_mb") * 2**20)
    return HttpAdapter.from_options(spec, given)


KIND = ModelKind(
    name="http", syntax="http://host:port[/path]", audience="http://",
    matches=lambda spec: spec.lower().startswith(("http://", "https://")), load=_load,
    options=OPTIONS, threads="none", adapters=("blackbox_vqa.adapters.http.endpoint",),
    no_gradients="an HTTP endpoint, which returns only probabilities")
