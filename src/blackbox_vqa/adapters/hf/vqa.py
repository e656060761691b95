"""HfAdapter: Hugging Face ``transformers`` VQA models behind the model protocol.

Model spec ``hf:PATH_OR_ID``: a folder written by ``save_pretrained`` (model and
processor), or a hub id where the hub can be reached. Two kinds are supported:

- **classifiers** (``ViltForQuestionAnswering``, and any
  ``AutoModelForVisualQuestionAnswering`` model that returns ``logits [B, num_labels]``):
  answers are ``config.id2label``; scores are a sigmoid of the logits when
  ``config.problem_type`` is ``"multi_label_classification"`` or unset (ViLT is trained
  multi-label with a binary cross-entropy, so its scores are sigmoids and need not sum
  to 1), a softmax when it is ``"single_label_classification"``;
- **generative** ``BlipForQuestionAnswering``: the answers are candidates (read from a
  file) plus the answer the model generates on the first input it sees (added so it can
  be explained). The score of a candidate is the softmax, over the candidates, of the
  total log-likelihood of its tokens plus the end-of-sequence token under teacher forcing
  (``score_semantics["kind"] == "candidate-normalised"``).

Images go through the model's own image processor, without rounding (float32 images are
scored exactly); see :mod:`blackbox_vqa.adapters.hf.processing`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from blackbox_vqa.adapters.base import BaseAdapter, ImageArray
from blackbox_vqa.adapters.gradients import InputGradients, answer_index
from blackbox_vqa.adapters.hf import loading
from blackbox_vqa.adapters.hf.calls import quiet_transformers, wrapped
from blackbox_vqa.adapters.hf.processing import HfProcessing, hf_score_semantics, word_positions
from blackbox_vqa.adapters.torch.forward import eval_mode
from blackbox_vqa.adapters.torch.hooks import embedding_offsets, guided_relu
from blackbox_vqa.adapters.torch.path_gradients import (
    GradientInputs,
    PathGradients,
    check_points,
    embedding_replaced,
    score_gradients,
)
from blackbox_vqa.errors import (
    BlackboxVQAError,
    InputError,
    ModelError,
    ModelLoadError,
    NotSupportedError,
    first_line,
)
from blackbox_vqa.images import ImageInput, to_rgb_array

__all__ = ["SUPPORTED_CLASSES", "HfAdapter", "hub_reachable", "word_positions"]

SUPPORTED_CLASSES = ("ViltForQuestionAnswering", "BlipForQuestionAnswering")
GENERATIVE_CLASSES = ("BlipForQuestionAnswering",)
Kind = Literal["classifier", "generative"]
# makes the context (a hook on get_input_embeddings()) active around the text embedding
WordHook = Callable[[], AbstractContextManager[Any]]
_SUPPORTED_TEXT = (
    "ViltForQuestionAnswering (or another classifier-style AutoModelForVisualQuestion"
    "Answering model) and BlipForQuestionAnswering"
)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT`` or huggingface.co) accepts a connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "True", "YES", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False





class HfAdapter(BaseAdapter):
    """A ``transformers`` VQA model and its processor behind the model protocol.

    Args:
        model: a ``ViltForQuestionAnswering``-like classifier or a
            ``BlipForQuestionAnswering``. Its training flags are restored after each call.
        processor: the model's processor (``image_processor`` and ``tokenizer``).
        candidates: candidate answers; required for generative models, not allowed for
            classifiers (their answers are ``config.id2label``).
        include_generated: generative models only: add the answer the model generates on
            the first input to the candidates (default ``True``).
        max_answer_tokens: generative models only: longest generated answer, in tokens.
        device: torch device; default CUDA when available, else CPU.
        name: display name.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        candidates: Sequence[str] | None = None,
        include_generated: bool = True,
        max_answer_tokens: int = 10,
        device: str | torch.device | None = None,
        name: str | None = None,
    ) -> None:
        cls_name = type(model).__name__
        self.kind: Kind = "generative" if cls_name in GENERATIVE_CLASSES else "classifier"
        config = getattr(model, "config", None)
        if self.kind == "classifier":
            if candidates is not None:
                raise InputError(
                    f"{cls_name} answers from its config.id2label; candidate answers "
                    "(--answers) are for generative models such as BLIP"
                )
            answers = _id2label_answers(config, cls_name)
        else:
            if not candidates:
                raise InputError(
                    f"{cls_name} generates its answers; give candidate answers to score "
                    "(--answers FILE, one answer a line)"
                )
            answers = list(dict.fromkeys(str(c).strip() for c in candidates if str(c).strip()))
        super().__init__(answers, name=name or cls_name)
        self.module: Any = model  # a transformers PreTrainedModel (untyped)
        self.processor = processor
        text_names: tuple[str, ...] = ("input_ids", "attention_mask")
        if self.kind == "classifier":
            text_names = ("input_ids", "attention_mask", "token_type_ids")
        self.processing = HfProcessing(
            processor, max_text_tokens=_max_positions(config, self.kind),
            text_names=text_names, name=self.name,
        )
        self.tokenizer: Any = self.processing.tokenizer
        self.image_processor: Any = self.processing.image_processor
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.module.to(self.device)
        self.output = _output_kind(config) if self.kind == "classifier" else "candidates"
        self.score_semantics: dict[str, str] = hf_score_semantics(self.output)
        self.include_generated = bool(include_generated) and self.kind == "generative"
        self.max_answer_tokens = int(max_answer_tokens)
        self.generated_answer: str | None = None

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        candidates: Sequence[str] | None = None,
        answers_file: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = None,
        name: str | None = None,
    ) -> HfAdapter:
        """Load a ``save_pretrained`` folder (or a hub id) with its processor.

        ``answers_file`` (one answer a line, or a JSON list) gives a generative model's
        candidates. Raises :class:`NotSupportedError` for an unsupported architecture
        and :class:`ModelLoadError` when the hub cannot be reached or loading fails.
        """
        try:
            import transformers as hf_module
        except ImportError as exc:
            raise NotSupportedError(
                f"hf: models need transformers ({exc}); pip install 'blackbox-vqa[hf]'"
            ) from exc
        text = os.fspath(source)
        local = Path(text).expanduser()
        if not local.exists() and _looks_like_path(text):
            raise InputError(f"model folder not found: {text} (hf:PATH needs a folder "
                             "written by save_pretrained)")
        if not local.exists() and not hub_reachable():
            raise ModelLoadError(
                f"{text!r} is not a local folder and the Hugging Face hub cannot be reached; "
                "download the model elsewhere and give its local folder (hf:PATH)"
            )
        location = str(local) if local.exists() else text
        transformers: Any = hf_module
        with quiet_transformers():
            config = _load_config(location)
            model_cls = _model_class(transformers, config, location)
            try:
                model = loading.load_model(model_cls, location)
                processor = loading.load_processor(location)
            except BlackboxVQAError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"cannot load {location!r}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
        if answers_file is not None:
            from blackbox_vqa.adapters.onnx.runtime import read_answers

            candidates = [*(candidates or []), *read_answers(answers_file)]
        return cls(model, processor, candidates=candidates, device=device,
                   name=name or f"hf:{text}")

    # -- inputs --------------------------------------------------------------------------

    def validate_question(self, question: str) -> str:
        """The stripped question; :class:`QuestionError` if it is longer than the model takes."""
        return self.processing.validate_question(question)

    def pixel_inputs(self, images: Sequence[ImageArray]) -> dict[str, torch.Tensor]:
        """``pixel_values [B, 3, H, W]`` in the model's dtype (and ``pixel_mask`` where the
        model takes one) on the adapter's device; see :mod:`.hf_processing`."""
        encoded = self.processing.pixels(images)
        out = {"pixel_values": encoded["pixel_values"].to(self.device, self.dtype)}
        if "pixel_mask" in encoded:
            out["pixel_mask"] = encoded["pixel_mask"].to(self.device)
        return out

    def text_inputs(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``[B, T]``, padded."""
        return {k: v.to(self.device) for k, v in self.processing.text(questions).items()}

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point type (inputs are cast to it)."""
        for param in self.module.parameters():
            if param.is_floating_point():
                return param.dtype  # type: ignore[no-any-return]
        return torch.float32

    # -- image-token ablation capability (ViLT) ------------------------------------------

    token_baseline = "attention-mask"

    def _vilt_embeddings(self) -> Any:
        vilt = getattr(self.module, "vilt", None)
        embeddings = getattr(vilt, "embeddings", None)
        if self.kind != "classifier" or not hasattr(embeddings, "visual_embed"):
            raise NotSupportedError(
                f"{self.name}: token occlusion needs a patch-token image path (ViLT); "
                f"{type(self.module).__name__} has none here"
            )
        return embeddings

    def image_token_grid(self, image: ImageInput) -> tuple[int, int]:
        """``(rows, cols)`` of ViLT's patch tokens for ``image`` (after its processor)."""
        self._vilt_embeddings()
        pixels = self.pixel_inputs([to_rgb_array(image)])["pixel_values"]
        patch = int(self.module.config.patch_size)
        return int(pixels.shape[2]) // patch, int(pixels.shape[3]) // patch

    def token_ablation_scores(
        self, image: ImageInput, question: str, cells: Sequence[Sequence[tuple[int, int]]]
    ) -> NDArray[np.float64]:
        """Scores ``[1 + len(cells), A]``: the original input, then the input with each
        cell's patch tokens ``(row, col)`` left out of attention (their attention-mask
        entries set to 0, as ViLT masks the padding of smaller images in training). The
        image is embedded once."""
        embeddings = self._vilt_embeddings()
        question = self.validate_question(question)
        rows, cols = self.image_token_grid(image)
        limit = getattr(self.module.config, "max_image_length", -1)
        if isinstance(limit, int) and 0 < limit < rows * cols:
            raise NotSupportedError(
                f"{self.name}: max_image_length={limit} samples {limit} of {rows * cols} "
                "patch tokens at random; token occlusion needs every token"
            )
        pixels = self.pixel_inputs([to_rgb_array(image)])
        text = self.text_inputs([question])
        mask = pixels.get("pixel_mask")
        if mask is None:
            mask = torch.ones((1, *pixels["pixel_values"].shape[2:]), dtype=torch.long,
                              device=self.device)
        out = []
        with eval_mode(self.module), torch.inference_mode(), _rng_kept(), \
                wrapped(self.name, "token occlusion"):
            tokens, token_mask, (where, _) = embeddings.visual_embed(
                pixels["pixel_values"], mask, max_image_length=limit)
            # patch_index [1, N, 2]: (row, col) of each token (ViLT shuffles them);
            # token 0 is the image's CLS token
            position = {(int(r), int(c)): j + 1 for j, (r, c) in
                        enumerate(where[0].tolist())}
            masks = [token_mask[0].clone()]
            for cell in cells:
                ablated = token_mask[0].clone()
                for rc in cell:
                    ablated[position[(int(rc[0]), int(rc[1]))]] = 0
                masks.append(ablated)
            for start in range(0, len(masks), 32):
                chunk = torch.stack(masks[start : start + 32])
                count = chunk.shape[0]
                logits = self.module(
                    **{k: v.expand(count, -1) for k, v in text.items()},
                    image_embeds=tokens.expand(count, -1, -1), pixel_mask=chunk,
                ).logits
                out.append(torch.softmax(logits, dim=-1) if self.output == "softmax"
                           else torch.sigmoid(logits))
        return torch.cat(out).double().cpu().numpy()

    # -- scores ---------------------------------------------------------------------------

    def _predict_batch(
        self, images: list[ImageArray], questions: list[str]
    ) -> NDArray[np.floating[Any]]:
        questions = [self.validate_question(q) for q in questions]
        self.prepare(images[0], questions[0])
        pixels = self.pixel_inputs(images)
        text = self.text_inputs(questions)
        with eval_mode(self.module), torch.inference_mode(), _rng_kept():
            scores = self.scores(pixels, text)
        return scores.double().cpu().numpy()

    def scores(
        self,
        pixels: Mapping[str, torch.Tensor],
        text: Mapping[str, torch.Tensor],
        *,
        words: WordHook | None = None,
    ) -> torch.Tensor:
        """Scores ``[B, A]`` (differentiable) for encoded inputs.

        ``words`` is a context manager factory applied around the text-embedding step
        (hooks on ``get_input_embeddings()`` run only there).
        """
        with wrapped(self.name, "forward pass"):
            if self.kind == "classifier":
                with words() if words is not None else nullcontext():
                    logits = self.module(**pixels, **text).logits
                if tuple(logits.shape) != (text["input_ids"].shape[0], len(self.answers)):
                    raise ModelError(
                        f"{self.name}: logits of shape {tuple(logits.shape)}, expected "
                        f"({text['input_ids'].shape[0]}, {len(self.answers)})"
                    )
                if self.output == "softmax":
                    return torch.softmax(logits, dim=-1)
                return torch.sigmoid(logits)
            return torch.softmax(self._candidate_loglik(pixels, text, words), dim=-1)

    def _question_states(
        self, pixels: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor],
        words: WordHook | None,
    ) -> torch.Tensor:
        """BLIP: the question encoder's states ``[B, T, D]`` attending to the image."""
        vision = self.module.vision_model(pixel_values=pixels["pixel_values"])
        image_states = vision.last_hidden_state
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long,
                                device=image_states.device)
        with words() if words is not None else nullcontext():
            encoded = self.module.text_encoder(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                encoder_hidden_states=image_states, encoder_attention_mask=image_mask,
            )
        return encoded.last_hidden_state

    def _candidate_loglik(
        self, pixels: Mapping[str, torch.Tensor], text: Mapping[str, torch.Tensor],
        words: WordHook | None,
    ) -> torch.Tensor:
        """BLIP: ``[B, C]`` total log-likelihood of each candidate's tokens plus ``[SEP]``."""
        states = self._question_states(pixels, text, words)
        lengths = text["attention_mask"].sum(dim=1)
        out = torch.empty((states.shape[0], len(self.answers)), dtype=torch.float64,
                          device=states.device)
        # One decoder call per question length, each question's states cut to its own
        # tokens: BLIP's text decoder ignores ``encoder_attention_mask`` in cross-attention
        # (transformers 5.x: the mask changes nothing), so padding would leak into scores.
        for length in torch.unique(lengths).tolist():
            rows = (lengths == length).nonzero()[:, 0]
            out[rows] = self._decode_candidates(states[rows, : int(length)])
        return out

    def _decode_candidates(self, states: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` log-likelihoods for question states ``[B, T, D]`` (no padding)."""
        ids, mask = self._candidate_tokens()
        batch, count = states.shape[0], ids.shape[0]
        decoded = self.module.text_decoder(
            input_ids=ids.repeat(batch, 1),
            attention_mask=mask.repeat(batch, 1),
            encoder_hidden_states=states.repeat_interleave(count, dim=0),
            return_dict=True,
        )
        logp = torch.log_softmax(decoded.logits[:, :-1].double(), dim=-1)
        targets = ids.repeat(batch, 1)[:, 1:]
        token_logp = logp.gather(-1, targets[..., None])[..., 0] * mask.repeat(batch, 1)[:, 1:]
        return token_logp.sum(dim=1).view(batch, count)

    def _candidate_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[C, L]`` decoder inputs ``[BOS] answer tokens [SEP] [PAD]...`` and their mask."""
        text_config = self.module.config.text_config
        bos, sep, pad = (text_config.bos_token_id, text_config.sep_token_id,
                         text_config.pad_token_id)
        rows = [[bos, *self.tokenizer(a, add_special_tokens=False)["input_ids"], sep]
                for a in self.answers]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate_answer(self, image: ImageInput, question: str) -> str:
        """BLIP: the answer the model generates (greedy) for one image and question."""
        if self.kind != "generative":
            raise NotSupportedError(f"{self.name} is a classifier; it does not generate")
        question = self.validate_question(question)
        pixels = self.pixel_inputs([to_rgb_array(image)])
        text = self.text_inputs([question])
        with eval_mode(self.module), torch.inference_mode(), wrapped(self.name, "generate"):
            out = self.module.generate(
                input_ids=text["input_ids"], pixel_values=pixels["pixel_values"],
                attention_mask=text["attention_mask"], max_new_tokens=self.max_answer_tokens,
            )
        return str(self.tokenizer.decode(out[0], skip_special_tokens=True)).strip()

    def add_generated_answer(self, image: ImageInput, question: str) -> str:
        """Generate the model's answer on this input and add it to the candidates (once).

        Called automatically on the first input; returns the generated answer (``""``
        when the model generates nothing, which is then not added).
        """
        answer = self.generate_answer(image, question)
        self.generated_answer = answer
        if answer and answer not in self._answers:
            self._answers = (*self._answers, answer)
        return answer

    @property
    def answers_follow_input(self) -> bool:
        """Whether preparing for an input changes the answer list (a generative model's
        generated answer joins its candidates)."""
        return self.include_generated

    def prepare(self, image: ImageInput, question: str) -> None:
        """Get ready to explain this input (the preparation capability): a generative
        model adds the answer it generates here to its candidates, so that it can be
        explained and the answer list stays fixed through the explanation."""
        if self.include_generated and self.generated_answer is None:
            self.add_generated_answer(image, question)

    # -- gradient protocol ---------------------------------------------------------------

    def _embedding(self) -> nn.Module:
        embedding = self.module.get_input_embeddings()
        if not isinstance(embedding, nn.Module):
            raise ModelError(f"{self.name}: get_input_embeddings() returned no module")
        return embedding

    def input_gradients(
        self,
        image: ImageInput,
        question: str,
        *,
        answer: str | int | None = None,
        guided: bool = False,
    ) -> InputGradients:
        """Gradients of the score of ``answer`` (default: predicted) w.r.t. ``pixel_values``
        ``[3, H, W]`` and each question word's embedding (``get_input_embeddings()``
        output; a word's sub-token gradients summed: ``words`` is ``[W, D]``, one row per
        word of ``text.split_words``). ``guided``: every ReLU met is guided;
        ``relus_guided`` counts them (0: the gradient is the plain one)."""
        question = self.validate_question(question)
        pixels_in = to_rgb_array(image)
        self.prepare(pixels_in, question)
        pixels = self.pixel_inputs([pixels_in])
        text = self.text_inputs([question])
        embedding = self._embedding()
        leaf = pixels["pixel_values"].detach().clone().requires_grad_(True)
        width = _embedding_width(embedding, text["input_ids"])
        offsets = torch.zeros((*text["input_ids"].shape, width), device=self.device,
                              dtype=self.dtype, requires_grad=True)
        with eval_mode(self.module), torch.inference_mode(False), torch.enable_grad(), \
                _rng_kept():
            scores = self.scores({**pixels, "pixel_values": leaf}, text,
                                 words=lambda: embedding_offsets(embedding, offsets))[0]
            values = scores.detach().double().cpu().numpy()
            predicted = int(np.argmax(values))
            index = answer_index(self.answers, answer, predicted)
            with guided_relu(guided) as mode, wrapped(self.name, "backward pass"):
                grads = torch.autograd.grad(scores[index], [leaf, offsets], allow_unused=True)
        image_grad, word_grad = (torch.zeros_like(w) if g is None else g
                                 for g, w in zip(grads, [leaf, offsets], strict=True))
        per_token = word_grad[0].detach().float().cpu().numpy()
        positions = self.processing.word_positions(question)
        words = np.stack([per_token[list(p)].sum(axis=0) for p in positions])
        return InputGradients(
            image=image_grad[0].detach().float().cpu().numpy(),
            words=words.astype(np.float32),
            token_ids=tuple(int(t) for t in text["input_ids"][0].tolist()),
            answer_index=index,
            predicted_index=predicted,
            scores=values,
            guided=guided,
            relus_guided=None if mode is None else mode.calls,
        )

    # -- path-gradient protocol (integrated gradients) -----------------------------------

    def gradient_inputs(self, image: ImageInput, question: str) -> GradientInputs:
        """``pixel_values [3, H, W]``, token embeddings ``[T, D]`` (``get_input_embeddings``),
        the padding token's embedding, each word's token positions and the scores."""
        question = self.validate_question(question)
        pixels_in = to_rgb_array(image)
        scores = self.answer_probs_batch([pixels_in], [question])[0]
        pixels = self.pixel_inputs([pixels_in])
        text = self.text_inputs([question])
        embedding = self._embedding()
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            vectors = embedding(text["input_ids"])[0]
            pad = embedding(torch.tensor([pad_id or 0], device=self.device))[0]
        return GradientInputs(
            question=question,
            image=pixels["pixel_values"][0].float().cpu().numpy(),
            embeddings=vectors.float().cpu().numpy(),
            pad_embedding=pad.float().cpu().numpy(),
            word_positions=self.processing.word_positions(question),
            token_ids=tuple(int(t) for t in text["input_ids"][0].tolist()),
            scores=scores,
        )

    def path_gradients(
        self,
        inputs: GradientInputs,
        images: NDArray[np.float32],
        embeddings: NDArray[np.float32],
        answer_index: int,
    ) -> PathGradients:
        """Score of ``answer_index`` and its gradients at ``N`` points (``pixel_values`` and
        the embedding output replaced by the given values)."""
        check_points(inputs, images, embeddings)
        count = images.shape[0]
        text = {k: v.expand(count, -1) for k, v in self.text_inputs([inputs.question]).items()}
        height, width = images.shape[-2:]
        extra = {}
        if self.processing.takes_pixel_mask:
            extra["pixel_mask"] = torch.ones((count, height, width), dtype=torch.long,
                                             device=self.device)
        embedding = self._embedding()

        def score_fn(image_leaf: torch.Tensor, words: torch.Tensor | None) -> torch.Tensor:
            scores = self.scores({"pixel_values": image_leaf, **extra}, text,
                                 words=lambda: embedding_replaced(embedding, words))
            return scores[:, answer_index]

        with eval_mode(self.module), _rng_kept():
            scores, image_grad, word_grad = score_gradients(
                score_fn, torch.from_numpy(images).to(self.device, self.dtype),
                torch.from_numpy(embeddings).to(self.device, self.dtype), name=self.name,
            )
        if word_grad is None:
            raise ModelError(f"{self.name}: no word-embedding gradients came back")
        return PathGradients(scores=scores, image=image_grad, embeddings=word_grad)


# -- helpers -------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub id (``name`` or ``org/name``)."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def _id2label_answers(config: Any, cls_name: str) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    try:
        answers = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError as exc:
        raise ModelLoadError(f"{cls_name}: config.id2label is not numbered 0..N-1") from exc
    if not answers:
        raise ModelLoadError(f"{cls_name}: config.id2label is empty; no answers to explain")
    return answers


def _output_kind(config: Any) -> str:
    """``"softmax"`` for single-label models, else ``"sigmoid"`` (VQA heads are multi-label)."""
    problem = getattr(config, "problem_type", None)
    return "softmax" if problem == "single_label_classification" else "sigmoid"


def _max_positions(config: Any, kind: Kind) -> int:
    source = getattr(config, "text_config", None) if kind == "generative" else config
    value = getattr(source, "max_position_embeddings", None) or getattr(
        config, "max_position_embeddings", 0)
    return int(value or 0)


def _embedding_width(embedding: nn.Module, ids: torch.Tensor) -> int:
    dim = getattr(embedding, "embedding_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(embedding(ids[:, :1]).shape[-1])


def _load_config(location: str) -> Any:
    try:
        return loading.load_config(location)
    except BlackboxVQAError:
        raise
    except Exception as exc:
        raise NotSupportedError(
            f"{location!r} holds no transformers model config ({first_line(exc)}); "
            f"supported: {_SUPPORTED_TEXT}"
        ) from exc


def _model_class(transformers: Any, config: Any, location: str) -> Any:
    """The model class to load: the config's architecture, if it is a supported one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES as VQA_NAMES,
    )

    architectures = list(getattr(config, "architectures", None) or [])
    wanted = VQA_NAMES.get(getattr(config, "model_type", ""), "")
    name = next((a for a in architectures if a in SUPPORTED_CLASSES), None)
    if name is None and wanted and wanted not in GENERATIVE_CLASSES and wanted in architectures:
        name = wanted
    if name is None or (name not in SUPPORTED_CLASSES and name.endswith("Generation")):
        found = ", ".join(architectures) or getattr(config, "model_type", "unknown")
        raise NotSupportedError(
            f"{location!r} is a {found} model; supported: {_SUPPORTED_TEXT}"
        )
    return getattr(transformers, name)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """Keep the caller's CPU random state: ViLT draws a random order of its image patches
    on every forward pass (the order does not change its outputs beyond rounding)."""
    with torch.random.fork_rng(devices=[]):
        yield



