"""GenerativeAdapter: chat vision-language models (LLaVA, Qwen2-VL, Idefics3/SmolVLM,
PaliGemma: ``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq``) behind ``hf:``.

The answer explained is the model's own greedy answer on the original input
(``generate``, at most ``max_tokens`` new tokens, stopping at end-of-sequence), or a
given answer text. The score of any (perturbed) input is the answer's exact sequence
probability under teacher forcing::

    p(answer | image, question) = exp(sum_i log p(token_i | image, prompt, tokens_<i))

with the end-of-sequence token included when the model ended its answer with it (it did
stop there: leaving it out would score every longer continuation of the answer alike).
A given ``--answer`` always gets the end-of-sequence token. The answer list the protocol
sees is ``(answer, "(other)")`` with scores ``(p, 1 - p)``; ``score_semantics["kind"]``
is ``"sequence"``. With candidate answers (``--answers FILE``) the scores are instead a
softmax over the candidates' total log-likelihoods (each with end-of-sequence), as for
BLIP (kind ``"candidate-normalised"``).

Perturbed inputs are scored in batches: one forward pass of the language model per batch
(right padding, so every row's positions and causal attention are those of its
unbatched pass) and the vocabulary projection only at the answer positions. Within one
explanation the vision tower's output and the key/value cache of the shared prompt prefix
are reused (:mod:`blackbox_vqa.adapters.hf.generative_reuse`; ``reuse=False`` turns it
off); every score stays that of the plain unbatched pass. Token occlusion (image tokens
left out of attention after one vision pass) is
:mod:`blackbox_vqa.adapters.hf.generative_tokens`.

Images go to the model's own processor as whole 0-255 levels: transformers' Pillow-based
image processors cannot resize fractional float images, so a float image is rounded to
the nearest level first (half a level at most; occlusion with a fractional baseline is
scored on the rounded image, the same for every method and for the direct computation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from blackbox_vqa.adapters.base import BaseAdapter, ImageArray, check_pairs, check_scores
from blackbox_vqa.adapters.hf.calls import quiet_transformers, wrapped
from blackbox_vqa.adapters.hf.generative_gradients import GenerativeGradients
from blackbox_vqa.adapters.hf.generative_inputs import image_key, images_once, whole_levels
from blackbox_vqa.adapters.hf.generative_reuse import Reuse
from blackbox_vqa.adapters.hf.generative_tokens import GenerativeTokenAblation, answer_logprobs
from blackbox_vqa.adapters.hf.prompts import PromptBuilder
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.errors import (
    BlackboxVQAError,
    ImageError,
    InputError,
    ModelError,
    ModelLoadError,
    NotSupportedError,
    QuestionError,
    first_line,
)
from blackbox_vqa.images import ImageInput, to_rgb_array
from blackbox_vqa.text import OTHER_ANSWER, split_words, validate_question

__all__ = [
    "OTHER",
    "GenerativeAdapter",
    "is_generative_vlm",
    "load_generative",
]

OTHER = OTHER_ANSWER
EMPTY = "(empty answer)"
DEFAULT_MAX_TOKENS = 8
DEFAULT_BATCH = 16


def _generative_names() -> set[str]:
    """Class names of ``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq`` models."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for table in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                  "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"):
        for value in getattr(modeling_auto, table, {}).values():
            names.update([value] if isinstance(value, str) else list(value))
    return names - {"BlipForQuestionAnswering", "BlipForConditionalGeneration"}


def is_generative_vlm(config: Any) -> bool:
    """Whether ``config`` names a generative image-text-to-text architecture."""
    architectures = list(getattr(config, "architectures", None) or [])
    return bool(set(architectures) & _generative_names())


def load_generative(location: str, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, processor)`` of a generative VLM folder (or hub id), through
    :mod:`~blackbox_vqa.adapters.hf.loading` (bounded, checked reads; a folder naming code
    of its own is refused unless ``trust_remote_code``)."""
    import transformers

    from blackbox_vqa.adapters.hf import loading

    hf: Any = transformers
    with quiet_transformers():
        try:
            config = loading.load_config(location, trust_remote_code=trust_remote_code)
        except BlackboxVQAError:
            raise
        except Exception as exc:
            raise NotSupportedError(f"{location!r} holds no transformers model config "
                                    f"({first_line(exc)})") from exc
        names = [a for a in (getattr(config, "architectures", None) or [])
                 if a in _generative_names()]
        try:
            model_cls = getattr(hf, names[0], None) if names else None
            if model_cls is None:
                model_cls = hf.AutoModelForImageTextToText
            model = loading.load_model(model_cls, location, trust_remote_code=trust_remote_code)
            processor = loading.load_processor(location, trust_remote_code=trust_remote_code)
        except BlackboxVQAError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load {location!r}: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
    return model, processor


class GenerativeAdapter(BaseAdapter, GenerativeGradients, GenerativeTokenAblation):
    """A generative VLM scored by the exact likelihood of one answer (see module docstring).

    Args:
        model: an image-text-to-text ``transformers`` model.
        processor: its processor (tokenizer, image processor, chat template).
        prompt: text template with ``{question}`` (default: the question itself).
        max_tokens: most tokens generated for the model's own answer (default 8).
        answer: explain this answer text instead of the generated one.
        candidates: candidate answers (candidate mode: softmax over candidates).
        batch_size: most inputs per forward pass (default 16).
        device: torch device (default: CUDA when available).
        name: display name.
        reuse: reuse the vision tower's output and the shared prompt prefix's key/value
            cache across the inputs of one explanation (default True; exact either way).

    On CUDA (``prefetch``) the processor encodes the next batch on a worker thread while the
    device scores the current one.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        prompt: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        answer: str | None = None,
        candidates: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH,
        device: str | torch.device | None = None,
        name: str | None = None,
        reuse: bool = True,
    ) -> None:
        cls_name = type(model).__name__
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens (--max-tokens) must be an integer >= 1, "
                             f"got {max_tokens!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.candidates = [c for c in dict.fromkeys(str(c).strip() for c in candidates or ())
                           if c]
        super().__init__(self.candidates or ["(answer)", OTHER], name=name or cls_name)
        self.module: Any = model
        self.processor = processor
        self.tokenizer: Any = getattr(processor, "tokenizer", None)
        if self.tokenizer is None or getattr(processor, "image_processor", None) is None:
            raise ModelLoadError(f"{self.name}: the processor {type(processor).__name__} lacks "
                                 "a tokenizer or an image processor")
        config = model.config
        self.model_type = str(getattr(config, "model_type", ""))
        self.prompts = PromptBuilder(processor, model_type=self.model_type, template=prompt,
                                     name=self.name)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.module.to(self.device)
        text_config = getattr(config, "text_config", config)
        self.max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.pad_id = _pad_id(model, self.tokenizer)
        self.answer_ids: tuple[int, ...] = ()
        self.answer_tokens: tuple[str, ...] = ()
        self.eos_included = False
        self.generated_answer: str | None = None
        self._fixed = False
        self._prepared: tuple[str, str] | None = None
        self._candidate_ids: list[tuple[int, ...]] = []
        self._valid: set[str] = set()  # questions already checked
        self.reuse = Reuse(model, self.model_type)
        self.reuse.enabled = self.reuse.enabled and bool(reuse)
        self._reuse_key: tuple[str, str] | None = None
        self.prefetch = self.device.type == "cuda"
        if answer is not None:
            self.choose_answer(answer)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        trust_remote_code: bool = False,
        answers_file: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> GenerativeAdapter:
        """Load a ``save_pretrained`` folder with :func:`load_generative`; ``options`` go to
        the constructor."""
        text = os.fspath(source)
        local = Path(text).expanduser()
        location = str(local) if local.exists() else text
        model, processor = load_generative(location, trust_remote_code=trust_remote_code)
        candidates = None
        if answers_file is not None:
            from blackbox_vqa.adapters.onnx.runtime import read_answers

            candidates = read_answers(answers_file)
        options.setdefault("name", f"hf:{text}")
        return cls(model, processor, candidates=candidates, **options)

    # -- capabilities ----------------------------------------------------------------------

    @property
    def score_semantics(self) -> dict[str, Any]:
        """What the scores mean (recorded in ``explanation.json``)."""
        if self.candidates:
            return {"kind": "candidate-normalised",
                    "note": "softmax over the candidate answers of each candidate's total "
                    "log-likelihood (answer tokens plus end-of-sequence) under teacher forcing",
                    "prompt_format": self.prompts.format}
        return {
            "kind": "sequence",
            "note": "exact probability of the explained answer's token sequence under "
            "teacher forcing, exp(sum of token log-probabilities); '(other)' is 1 minus it",
            "answer_tokens": list(self.answer_tokens),
            "eos_included": self.eos_included,
            "prompt_format": self.prompts.format,
        }

    @property
    def own_answer(self) -> str | None:
        """The answer explained by default: the generated (or chosen) one; None in candidate
        mode (the arg-max of the candidates is explained there)."""
        return None if self.candidates or not self.answer_ids else self._answers[0]

    @property
    def preferred_batch_size(self) -> int:
        """Inputs per call: one forward pass each."""
        return self.batch_size

    def validate_question(self, question: str) -> str:
        """The stripped question; :class:`QuestionError` when the prompt would not fit."""
        question = validate_question(question)
        if question in self._valid:
            return question
        count = len(self.tokenizer(self.prompts(question))["input_ids"])
        if self.max_positions and count >= self.max_positions:
            raise QuestionError(f"the prompt has {count} tokens but {self.name} takes at most "
                                f"{self.max_positions}")
        if len(self._valid) < 4096:
            self._valid.add(question)
        return question

    def _scored_question(self, question: str) -> str:
        """A (perturbed) input's question for scoring: as :meth:`validate_question`, but a
        question with every word dropped (empty, or punctuation alone: MM-SHAP's empty
        coalition, word occlusion of a one-word question) is scored too. A chat VLM takes
        such a prompt: the user turn then holds the image (and the punctuation) alone."""
        text = str(question).strip()
        return self.validate_question(text) if split_words(text) else text

    def choose_answer(self, answer: str) -> None:
        """Explain ``answer`` (text) instead of the generated one (``--answer``)."""
        text = str(answer).strip()
        if not text:
            raise InputError("--answer must not be empty")
        if self.candidates:
            if text not in self.candidates:
                self.candidates.append(text)
                self._answers = tuple(self.candidates)
            return
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        decoded = str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
        if not ids or (unk is not None and unk in ids) or decoded != text:
            raise InputError(f"--answer {text!r}: the tokenizer of {self.name} cannot encode it "
                             f"(it reads back as {decoded!r})")
        eos = next(iter(self.eos_ids), None)
        self._set_answer(text, ids, eos_included=eos is not None, eos=eos)
        self._fixed = True

    @property
    def answers_follow_input(self) -> bool:
        """Whether preparing for an input changes the answer list: its generated answer
        is the explained one, or joins the candidates (False once an answer was chosen)."""
        return not self._fixed

    def prepare(self, image: ImageInput, question: str) -> None:
        """Generate the model's answer on this input (once per input) unless an answer was
        chosen; the answer list is then ``(answer, "(other)")``. A new input clears the
        reuse caches."""
        key = (question, image_key(to_rgb_array(image)))
        if self._reuse_key != key:
            self.reuse.clear()
            self._reuse_key = key
        if self._fixed or self._prepared == key:
            return
        answer = self.generate_answer(image, question)
        self._prepared = key
        if self.candidates:
            if answer not in self.candidates:
                self._answers = (*self.candidates, answer)
            return

    # -- generation ------------------------------------------------------------------------

    def generate_answer(self, image: ImageInput, question: str) -> str:
        """The model's greedy answer (text) on one input; sets the explained answer."""
        question = self.validate_question(question)
        encoded = self.encode([whole_levels(to_rgb_array(image))], [question])
        with eval_mode(self.module), torch.inference_mode(), wrapped(self.name, "generate"):
            out = self.module.generate(**encoded, max_new_tokens=self.max_tokens,
                                       do_sample=False, num_beams=1)
        new = [int(t) for t in out[0, encoded["input_ids"].shape[1]:].tolist()]
        stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
        ids = new if stop is None else new[:stop]
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip() or EMPTY
        eos = None if stop is None else new[stop]
        self.generated_answer = text
        if not self.candidates:
            self._set_answer(text, ids, eos_included=stop is not None, eos=eos)
        return text

    def _set_answer(self, text: str, ids: Sequence[int], *, eos_included: bool,
                    eos: int | None) -> None:
        sequence = [*ids, eos] if eos_included and eos is not None else list(ids)
        if not sequence:
            raise ModelError(f"{self.name}: the answer has no tokens to score")
        self.answer_ids = tuple(sequence)
        self.answer_tokens = tuple(str(self.tokenizer.convert_ids_to_tokens(i))
                                   for i in sequence)
        self.eos_included = eos_included
        label = text if text != OTHER else f"{text} "
        self._answers = (label, OTHER)

    # -- inputs ----------------------------------------------------------------------------

    def encode(self, images: Sequence[NDArray[np.uint8]], questions: Sequence[str], *,
               keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The processor's tensors for ``B`` prompts and images, right-padded, on the device
        (``input_ids [B, T]``, ``attention_mask [B, T]``, pixel tensors of the family).
        Each distinct image is processed once (``keys``: the images' :func:`image_key`,
        computed when not given)."""
        prompts = [self.prompts(q) for q in questions]
        if keys is None:
            keys = [image_key(im) for im in images]
        side = getattr(self.tokenizer, "padding_side", "right")
        self.tokenizer.padding_side = "right"

        try:
            with quiet_transformers(), images_once(self.processor, images, keys):
                encoded = self.processor(text=prompts, images=[[im] for im in images],
                                         padding=True, return_tensors="pt")
        except BlackboxVQAError:
            raise
        except Exception as exc:
            shape = "x".join(str(s) for s in images[0].shape) if images else "?"
            raise ImageError(f"{self.name}: the processor rejects the image ({shape}): "
                             f"{first_line(exc)}") from exc
        finally:
            self.tokenizer.padding_side = side
        return {k: v.to(self.device) for k, v in encoded.items() if k != "labels"}

    # -- scores ----------------------------------------------------------------------------

    def _predict_batch(self, images: list[ImageArray], questions: list[str]
                       ) -> NDArray[np.floating[Any]]:
        questions = [self._scored_question(q) for q in questions]
        if not self._fixed and self._prepared is None:  # first input seen: its answer
            self.prepare(images[0], questions[0])
        levels = [whole_levels(image) for image in images]
        keys = [image_key(im) for im in levels]
        candidates = self._candidates_ids() if self.candidates else []
        with quiet_transformers():  # one spell over every batch, prefetched ones too
            rows = [self._scores(encoded, keys[chunk], candidates)
                    for chunk, encoded in self._encoded(levels, questions, keys)]
        return np.concatenate(rows, axis=0)

    def _encoded(self, images: list[NDArray[np.uint8]], questions: list[str],
                 keys: list[str]) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """``(rows, encoded)`` of each batch of at most ``batch_size`` inputs in turn; with
        ``prefetch`` the next batch is encoded on a worker thread meanwhile (the processor
        is then used by that thread alone)."""
        chunks = [slice(s, s + self.batch_size) for s in range(0, len(images), self.batch_size)]

        def encode(chunk: slice) -> dict[str, torch.Tensor]:
            return self.encode(images[chunk], questions[chunk], keys=keys[chunk])

        if not self.prefetch or len(chunks) < 2:
            for chunk in chunks:
                yield chunk, encode(chunk)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(encode, chunks[0])
            for index, chunk in enumerate(chunks):
                encoded = pending.result()
                if index + 1 < len(chunks):
                    pending = pool.submit(encode, chunks[index + 1])
                yield chunk, encoded

    def _scores(self, encoded: dict[str, torch.Tensor], keys: list[str],
                candidates: list[tuple[int, ...]]) -> NDArray[np.float64]:
        if self.candidates:
            logliks = np.stack([self.token_logprobs(encoded, ids, image_keys=keys).sum(axis=1)
                                for ids in candidates], axis=1)
            shifted = np.exp(logliks - logliks.max(axis=1, keepdims=True))
            return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))
        logp = self.token_logprobs(encoded, self.answer_ids, image_keys=keys).sum(axis=1)
        prob = np.exp(logp)
        return np.stack([prob, np.clip(1.0 - prob, 0.0, 1.0)], axis=1)

    # -- per-answer-token scores (SupportsAnswerTokenScores) -------------------------------

    @property
    def token_answer(self) -> str | None:
        """The answer whose tokens are scored one by one: the explained answer; None in
        candidate mode (scores there are a softmax over candidates, not one product)."""
        return self.own_answer

    @property
    def answer_token_labels(self) -> tuple[str, ...]:
        """The explained answer's tokens as the tokenizer names them (end-of-sequence
        included when it is scored)."""
        return () if self.candidates else self.answer_tokens

    @property
    def answer_token_texts(self) -> tuple[str, ...]:
        """Each of :attr:`answer_token_labels` decoded alone (special tokens kept)."""
        return tuple(str(self.tokenizer.decode([i], skip_special_tokens=False))
                     for i in (() if self.candidates else self.answer_ids))

    def answer_probs_with_token_logprobs(
        self, images: Sequence[ImageInput], questions: Sequence[str]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``answer_probs_batch`` and, from the same forward passes, ``[B, L]`` (float64)
        log p(answer token i | input, tokens < i) of the explained answer."""
        if self.candidates:
            raise NotSupportedError(f"{self.name}: candidate mode has no per-token scores")
        check_pairs(images, questions)
        arrays = [to_rgb_array(im) for im in images]
        questions = [self._scored_question(q) for q in questions]
        if arrays and not self._fixed and self._prepared is None:
            self.prepare(arrays[0], questions[0])
        levels = [whole_levels(a) for a in arrays]
        keys = [image_key(im) for im in levels]
        rows = [np.zeros((0, len(self.answer_ids)))]
        with quiet_transformers():  # one spell over every batch, prefetched ones too
            for chunk, encoded in self._encoded(levels, questions, keys):
                rows.append(self.token_logprobs(encoded, self.answer_ids,
                                                image_keys=keys[chunk]))
        found = np.concatenate(rows, axis=0)
        prob = np.exp(found.sum(axis=1))
        scores = np.stack([prob, np.clip(1.0 - prob, 0.0, 1.0)], axis=1)
        return check_scores(scores, len(arrays), 2, source=self.name), found

    def _candidates_ids(self) -> list[tuple[int, ...]]:
        eos = next(iter(self.eos_ids), None)
        return [(*self.tokenizer(a, add_special_tokens=False)["input_ids"],
                 *(() if eos is None else (eos,))) for a in self.answers]

    def sequence_logprob(self, image: ImageInput, question: str) -> float:
        """log p(answer | image, question): the explained answer's summed token
        log-probabilities on one input (unbatched)."""
        question = self.validate_question(question)
        if not self._fixed and self._prepared is None:
            self.prepare(image, question)
        levels = whole_levels(to_rgb_array(image))
        keys = [image_key(levels)]
        encoded = self.encode([levels], [question], keys=keys)
        return float(self.token_logprobs(encoded, self.answer_ids, image_keys=keys).sum())

    def token_logprobs(self, encoded: dict[str, torch.Tensor], answer_ids: Sequence[int], *,
                       image_keys: Sequence[str] | None = None) -> NDArray[np.float64]:
        """``[B, L]`` (float64): log p(answer token i | input, tokens < i) for each input,
        one teacher-forced forward pass over the prompts with the answer appended.
        ``image_keys``: each row's :func:`image_key` of its ``uint8`` image (the vision
        cache's key; without them the processed pixel tensors are digested)."""
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        lengths = mask.sum(dim=1)
        count, width = ids.shape
        answer = torch.tensor(list(answer_ids), dtype=ids.dtype, device=ids.device)
        size = answer.shape[0]
        if self.max_positions and int(lengths.max()) + size > self.max_positions:
            raise InputError(
                f"the prompt ({int(lengths.max())} tokens) and the answer ({size} tokens) "
                f"exceed {self.name}'s context of {self.max_positions} positions"
            )
        place = (torch.arange(width + size, device=ids.device)[None] - lengths[:, None])
        prompt, in_answer = place < 0, (place >= 0) & (place < size)
        wide = torch.nn.functional.pad(ids, (0, size), value=self.pad_id)
        full = torch.where(prompt, wide, answer[place.clamp(0, size - 1)])
        full = torch.where(prompt | in_answer, full, self.pad_id)
        full_mask = (place < size).to(mask.dtype)
        types = in_answer.to(ids.dtype)
        extra = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
        for key, value in encoded.items():  # per-token tensors: the answer's are text tokens
            if key in extra and tuple(value.shape) == (count, width):
                grown = torch.nn.functional.pad(value, (0, size))
                extra[key] = torch.where(prompt, grown, torch.zeros_like(grown))
        if "token_type_ids" in encoded:  # PaliGemma: prefix 0 (bidirectional), answer 1
            extra["token_type_ids"] = types
        positions = lengths[:, None] - 1 + torch.arange(size, device=ids.device)[None]
        with eval_mode(self.module), torch.inference_mode(), \
                wrapped(self.name, "forward pass"):
            if self.reuse.applies(extra, count):
                picked = self.reuse.picked(full, full_mask, extra, positions,
                                           keys=image_keys)
            else:
                hidden = self.module.model(input_ids=full, attention_mask=full_mask,
                                           **extra).last_hidden_state
                picked = hidden.gather(1, positions[..., None].expand(-1, -1,
                                                                      hidden.shape[-1]))
            found = answer_logprobs(self.module, picked, answer, self.softcap)
        return found.cpu().numpy()


# -- helpers -------------------------------------------------------------------------------


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    values = found if isinstance(found, (list, tuple)) else [found]
    ids = [int(v) for v in values if v is not None]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(ids)


def _pad_id(model: Any, tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id,
                  getattr(getattr(model, "generation_config", None), "pad_token_id", None),
                  tokenizer.eos_token_id):
        if value is not None:
            return int(value if not isinstance(value, (list, tuple)) else value[0])
    return 0


