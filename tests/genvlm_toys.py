"""Tiny random-weight generative VLMs of four families, built offline for the tests.

LLaVA (CLIP + Llama), Qwen2-VL, Idefics3 (SmolVLM) and PaliGemma (SigLIP + Gemma), each
with a byte-level BPE tokenizer trained here and (but PaliGemma) a chat template. Weights
are drawn wide (normal, std ``INIT``) so that answers and maps differ between inputs; the
output rows of tokens that do not decode to printable ASCII are zeroed so answers read as
text. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

INIT = 0.2
FAMILIES = ("llava", "qwen2vl", "idefics3", "paligemma")

WORDS = """what color is the shape answer question with a single word or number yes no
red green blue yellow black white gray circle square triangle rectangle one two three four
five six seven eight nine ten how many shapes are there in image picture left right top
bottom man holding cat dog car tree the a an of and is it this that user assistant"""

_LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_IDEFICS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = {
    "llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "idefics3": ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<fake_token_around_image>",
                 "<global-img>", "<end_of_utterance>"],
    "qwen2vl": ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "paligemma": ["<unk>", "<bos>", "<eos>", "<pad>", "<image>"],
}


def _tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[family]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = WORDS.split()
    corpus = [" ".join(words[i:i + 7]) for i in range(0, len(words), 3)] * 20
    corpus += ["user: what color\nassistant: blue\n", "\n"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if family == "qwen2vl":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            unk_token="<unk>", model_max_length=512,
            extra_special_tokens={"image_token": "<|image_pad|>",
                                  "video_token": "<|video_pad|>",
                                  "vision_bos_token": "<|vision_start|>",
                                  "vision_eos_token": "<|vision_end|>"})
    bos, eos = ("<bos>", "<eos>") if family == "paligemma" else ("<s>", "</s>")
    if family == "idefics3":
        eos = "<end_of_utterance>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
        pad_token="<pad>", model_max_length=512, extra_special_tokens={"image_token": "<image>"})


def _llama(tokenizer: Any, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, **extra)


def _build(family: str, tokenizer: Any) -> tuple[Any, Any]:
    import transformers as tf

    if family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
        config = tf.LlavaConfig(vision_config=vision, text_config=_llama(tokenizer),
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                vision_feature_select_strategy="default",
                                vision_feature_layer=-2, image_seq_length=16)
        model = tf.LlavaForConditionalGeneration(config)
        images = tf.CLIPImageProcessor(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})
        processor = tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer,
                                      patch_size=8, vision_feature_select_strategy="default",
                                      num_additional_image_tokens=1,
                                      chat_template=_LLAVA_TEMPLATE)
    elif family == "idefics3":
        vision = tf.Idefics3VisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=8)
        config = tf.Idefics3Config(vision_config=vision, text_config=_llama(tokenizer),
                                   scale_factor=2,
                                   image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                   tie_word_embeddings=False)
        model = tf.Idefics3ForConditionalGeneration(config)
        images = tf.Idefics3ImageProcessor(do_image_splitting=False,
                                           size={"longest_edge": 32},
                                           max_image_size={"longest_edge": 32})
        processor = tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer,
                                         image_seq_len=4, chat_template=_IDEFICS_TEMPLATE)
    elif family == "qwen2vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import (
            Qwen2VLTextConfig,
            Qwen2VLVisionConfig,
        )

        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS["qwen2vl"]}
        vision = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2,
                                     patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        text = Qwen2VLTextConfig(vocab_size=len(tokenizer), hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=512,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 6, 6]},
                                 bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                                 pad_token_id=ids["<|endoftext|>"])
        config = tf.Qwen2VLConfig(vision_config=vision, text_config=text,
                                  image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
        model = tf.Qwen2VLForConditionalGeneration(config)
        images = tf.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                             min_pixels=32 * 32, max_pixels=32 * 32)
        processor = _qwen_processor(images, tokenizer)
    elif family == "paligemma":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=64)
        text = tf.GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, max_position_embeddings=512,
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        config = tf.PaliGemmaConfig(vision_config=vision, text_config=text,
                                    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                    vocab_size=len(tokenizer), projection_dim=64, hidden_size=64,
                                    tie_word_embeddings=False)
        config.text_config.num_image_tokens = 16
        config.vision_config.num_image_tokens = 16
        model = tf.PaliGemmaForConditionalGeneration(config)
        images = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
        images.image_seq_length = 16
        processor = tf.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    else:
        raise ValueError(family)
    return model, processor


def _qwen_processor(images: Any, tokenizer: Any) -> Any:
    """Qwen2VLProcessor without a video processor (none can be built without torchvision)."""
    import transformers as tf

    class ImagesOnly(tf.Qwen2VLProcessor):  # type: ignore[misc]
        def check_argument_for_proper_class(self, name: str, argument: Any) -> Any:
            if name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(name, argument)

    ImagesOnly.__name__ = "Qwen2VLProcessor"
    return ImagesOnly(image_processor=images, tokenizer=tokenizer, video_processor=None,
                      chat_template=_QWEN_TEMPLATE)


def build(family: str, folder: Path, *, seed: int = 0) -> Path:
    """Write a tiny ``family`` model and its processor to ``folder``; return it."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(family)
    model, processor = _build(family, tokenizer)
    model.eval()
    specials = set(_SPECIALS[family])
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, INIT)
        head = model.get_output_embeddings().weight
        for index in range(len(tokenizer)):
            text = tokenizer.decode([index])
            token = tokenizer.convert_ids_to_tokens(index)
            if token == tokenizer.eos_token:
                continue
            if (not text.strip() or not text.isascii() or not text.isprintable()
                    or token in specials):
                head[index].zero_()
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if family == "qwen2vl":  # saved by parts: save_pretrained needs the video processor
        import json

        processor.tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        (folder / "chat_template.jinja").write_text(_QWEN_TEMPLATE)
        (folder / "processor_config.json").write_text(
            json.dumps({"processor_class": "Qwen2VLProcessor"}))
    else:
        processor.save_pretrained(folder)
    return folder


def image(seed: int = 0, size: int = 40) -> np.ndarray:
    """A random ``size x size x 3`` uint8 image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def direct_token_logprobs(model: Any, processor: Any, pixels: np.ndarray, question: str,
                          answer: list[int]) -> list[float]:
    """log p(answer token i | image, question, tokens < i) straight from transformers: the
    processor on one input (the chat template's user turn, or the bare question without
    one), the prompt plus answer through the full model, log-softmax of all logits."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
    else:
        prompt = question
    levels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    inputs = processor(text=[prompt], images=[[levels]], return_tensors="pt")
    ids = inputs.pop("input_ids")
    n = ids.shape[1]
    full = torch.cat([ids, torch.tensor([answer])], dim=1)
    kwargs: dict[str, Any] = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs["attention_mask"] = torch.ones_like(full)
    if "mm_token_type_ids" in kwargs:  # Qwen2-VL: the answer's tokens are text (0)
        kwargs["mm_token_type_ids"] = torch.cat(
            [kwargs["mm_token_type_ids"], torch.zeros((1, len(answer)), dtype=ids.dtype)], dim=1)
    if "token_type_ids" in kwargs:  # PaliGemma: prefix 0, answer 1
        kwargs["token_type_ids"] = torch.cat(
            [torch.zeros_like(ids), torch.ones((1, len(answer)), dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, **kwargs).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[n - 1 + i, t]) for i, t in enumerate(answer)]
