"""Prompts of generative vision-language models: one user turn with the image and the question.

With a chat template (LLaVA, Qwen2-VL, Idefics3/SmolVLM...) the prompt is the processor's
``apply_chat_template`` of one user message ``[image, text]`` with the generation prompt
added. PaliGemma has no chat template; its documented format is the bare task text (the
processor puts the image tokens and ``<bos>`` before it and ``"\\n"`` after it). The text is
the question, or ``template.format(question=...)`` when a ``--prompt`` template is given.
"""

from __future__ import annotations

from typing import Any

from blackbox_vqa.errors import InputError, NotSupportedError

__all__ = ["PLAIN_PROMPT_MODELS", "PromptBuilder", "check_template"]

#: Model types whose documented prompt is the bare text (the processor adds the rest).
PLAIN_PROMPT_MODELS = ("paligemma",)


def check_template(template: str | None) -> str | None:
    """Return ``template`` if it holds ``{question}`` and formats, else raise InputError."""
    if template is None:
        return None
    if "{question}" not in template:
        raise InputError(f"--prompt must contain {{question}}, got {template!r}")
    try:
        template.format(question="q")
    except (IndexError, KeyError, ValueError) as exc:
        raise InputError(f"--prompt {template!r} does not format: {exc}") from exc
    return template


class PromptBuilder:
    """Builds the prompt string for a question.

    Args:
        processor: the model's processor (its ``chat_template``, if any, is used).
        model_type: ``config.model_type`` (decides the prompt format without a template).
        template: optional text template with ``{question}``.
        name: model name for messages.
    """

    def __init__(self, processor: Any, *, model_type: str, template: str | None,
                 name: str) -> None:
        self.processor = processor
        self.template = check_template(template)
        self.chat = bool(getattr(processor, "chat_template", None))
        if not self.chat and model_type not in PLAIN_PROMPT_MODELS:
            raise NotSupportedError(
                f"{name}: the processor has no chat template and {model_type!r} has no known "
                f"prompt format (known without a template: {', '.join(PLAIN_PROMPT_MODELS)})"
            )
        self.format = "chat-template" if self.chat else "plain"
        self._built: dict[str, str] = {}  # question -> prompt (the template is rendered once)

    def text(self, question: str) -> str:
        """The user text: the question, or the template filled with it."""
        return question if self.template is None else self.template.format(question=question)

    def __call__(self, question: str) -> str:
        """The full prompt string for ``question`` (image placeholder included where the
        chat template puts one)."""
        found = self._built.get(question)
        if found is not None:
            return found
        text = self.text(question)
        if self.chat:
            messages = [{"role": "user",
                         "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            text = str(self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False))
        if len(self._built) < 4096:
            self._built[question] = text
        return text
