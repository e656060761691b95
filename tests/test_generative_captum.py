"""Parity with Captum 0.9 on a tiny LLaVA: our occlusion (image cells and word drops, score
log-probability) equals ``LLMAttribution(FeatureAblation(model), tokenizer)`` over an
``ImageMaskInput`` (same 8 x 8 cells, same constant fill) and over the question's words.

Mapping of settings: Captum ``attr_target="log_prob"`` (its default) = our ``--score
log-probability``; Captum's target = our answer's token ids (passed as a tensor, so the
end-of-sequence token is scored as we score it); ``forward_in_tokens=False`` (Captum's
default path drops the image); cells: Captum mask id ``r * 8 + c`` over the same pixel rows
and columns as our grid cell ``(r, c)``; fill: ``baseline=(R, G, B)`` = our ``--baseline
R,G,B``; words: Captum's ``TextTemplateInput`` with a callable template that rebuilds the
question from the words kept (a removed word is ``""``; we drop it and its space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

import torch  # noqa: E402
from captum.attr._utils.interpretable_input import (  # noqa: E402
    ImageMaskInput,
    TextTemplateInput,
)
from PIL import Image  # noqa: E402

from blackbox_vqa.adapters.hf.generative import GenerativeAdapter  # noqa: E402
from blackbox_vqa.explain import explain  # noqa: E402
from genvlm_toys import build, image  # noqa: E402

QUESTION = "what color is the shape"
GRID, SIZE = 8, 64
FILL = (10, 200, 30)


def test_occlusion_equals_captum_llm_feature_ablation(tmp_path: Path) -> None:
    folder = build("llava", tmp_path / "llava")
    adapter = GenerativeAdapter.from_pretrained(folder, answer="red circle", device="cpu")
    pixels = image(5, SIZE)
    found = explain(adapter, pixels, QUESTION, methods="occlusion", grid=GRID,
                    baseline=",".join(map(str, FILL)), score="log-probability")
    ours = found.attribution("occlusion")

    model, processor = adapter.module, adapter.processor
    llm = captum_attr.LLMAttribution(captum_attr.FeatureAblation(model), adapter.tokenizer)
    target = torch.tensor(list(adapter.answer_ids))

    def inputs(picture: object, question: str) -> object:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        return processor(text=prompt, images=picture, return_tensors="pt")

    mask = torch.zeros((SIZE, SIZE), dtype=torch.int64)
    cell = SIZE // GRID
    for r in range(GRID):
        for c in range(GRID):
            mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = r * GRID + c
    picture = Image.fromarray(pixels)
    cells = ImageMaskInput(image=picture, mask=mask, baseline=FILL,
                           processor_fn=lambda im: inputs(im, QUESTION))
    with torch.no_grad():
        result = llm.attribute(cells, target=target, forward_in_tokens=False)
    theirs = result.seq_attr.double().numpy().reshape(GRID, GRID)
    np.testing.assert_allclose(np.asarray(ours.image_map), theirs, atol=1e-5, rtol=0)
    assert np.abs(theirs).max() > 1e-3

    words = QUESTION.split()
    text = TextTemplateInput(
        template=lambda *kept: inputs(picture, " ".join(w for w in kept if w)), values=words)
    with torch.no_grad():
        result = llm.attribute(text, target=target, forward_in_tokens=False)
    np.testing.assert_allclose(np.asarray(ours.word_map),
                               result.seq_attr.double().numpy(), atol=1e-5, rtol=0)
