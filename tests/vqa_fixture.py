"""A small VQA v2 + VQA-HAT folder in the real file formats, for dataset and CLI tests.

Questions 1001 and 1002 are usable; 1003 has no image, 1004 no human map and 1005 no
annotation. Image 1 is a white square (rows 16-47, columns 16-31) on a grey that is
almost the occlusion fill, so occluding a background cell barely changes its brightness;
map ``1001_1`` is exactly that square and ``1001_2`` a second human's different square.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = (115, 115, 114)


@dataclass(frozen=True)
class VQAFixture:
    questions: Path
    annotations: Path
    images: Path
    hat: Path

    def options(self) -> list[str]:
        return ["--dataset", "vqa", "--questions", str(self.questions), "--annotations",
                str(self.annotations), "--images", str(self.images), "--hat", str(self.hat)]


def square_image() -> np.ndarray:
    pixels = np.empty((64, 64, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    pixels[16:48, 16:32] = 255
    return pixels


def square_mask() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:32] = 255
    return mask


def build_vqa_fixture(root: Path) -> VQAFixture:
    images = root / "val2014"
    hat = root / "vqahat_val"
    images.mkdir(parents=True)
    hat.mkdir()
    Image.fromarray(square_image()).save(images / "COCO_val2014_000000000001.png")
    ramp = np.linspace(60, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).save(images / "COCO_val2014_000000000002.jpg", quality=95)
    (images / "README.txt").write_text("not an image")
    questions = [
        {"image_id": 1, "question": "Is the square bright?", "question_id": 1001},
        {"image_id": 2, "question": "Is it not dark?", "question_id": 1002},
        {"image_id": 3, "question": "What is this?", "question_id": 1003},
        {"image_id": 1, "question": "What color is it?", "question_id": 1004},
        {"image_id": 2, "question": "Is this dark?", "question_id": 1005},
    ]
    q_path = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    q_path.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                                  "license": {}, "data_subtype": "val2014",
                                  "questions": questions}))
    answers = {1001: ["yes"] * 2 + ["bright"] * 8, 1002: ["dark"] * 2 + ["bright"] * 8,
               1003: ["cat"] * 10, 1004: ["white"] * 10}
    annotations = [
        {"question_id": qid, "image_id": next(q["image_id"] for q in questions
                                               if q["question_id"] == qid),
         "question_type": "is the", "answer_type": "other",
         "multiple_choice_answer": given[-1],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(given)]}
        for qid, given in answers.items()
    ]
    a_path = root / "v2_mscoco_val2014_annotations.json"
    a_path.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "val2014",
                                  "annotations": annotations}))
    Image.fromarray(square_mask()).save(hat / "1001_1.png")
    other = np.zeros((64, 64), dtype=np.uint8)
    other[8:40, 20:56] = 200
    Image.fromarray(other).save(hat / "1001_2.png")
    blob = np.zeros((48, 48), dtype=np.uint8)
    blob[30:46, 2:20] = 255
    blob[5:10, 5:40] = 90
    Image.fromarray(blob).save(hat / "1002_1.png")
    Image.fromarray(blob).save(hat / "1005_1.png")
    (hat / "index.html").write_text("ignored")
    return VQAFixture(q_path, a_path, images, hat)
