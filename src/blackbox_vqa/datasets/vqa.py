"""VQA v1/v2 files (questions, annotations, COCO-named images) and VQA-HAT attention maps.

- Questions: a JSON object with a ``questions`` list of
  ``{"question_id", "image_id", "question"}`` (other keys are ignored).
- Annotations: a JSON object with an ``annotations`` list of
  ``{"question_id", "multiple_choice_answer", "answers": [{"answer", ...}, ...]}``.
- Images: a folder of COCO-named files, ``COCO_val2014_000000262148.jpg`` (any prefix,
  the number after the last ``_`` is the image id; ``.jpg``, ``.jpeg`` or ``.png``).
- VQA-HAT maps: a folder of ``{question_id}_{n}.png`` grey-scale maps, one to three per
  question (white = attended).

Questions whose image (or, when a map folder is given, map; when an annotation file is
given, annotation) is missing are skipped and counted by reason.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from blackbox_vqa.datasets.items import DatasetListing, Item
from blackbox_vqa.errors import ImageError, InputError

__all__ = ["index_hat_maps", "index_images", "list_vqa", "load_hat_map", "read_annotations",
           "read_questions"]

_IMAGE_RE = re.compile(r"^[A-Za-z][\w-]*?_(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
_HAT_RE = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


def _read_json(path: Path, option: str) -> Any:
    if not path.is_file():
        raise InputError(f"{option} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{option} file {path} is not readable JSON: {exc}") from exc


def _entries(data: Any, key: str, path: Path, option: str) -> list[Mapping[str, Any]]:
    entries = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise InputError(f"{option} file {path} is not in the VQA format: no {key!r} list")
    return entries


def read_questions(path: str | Path) -> list[tuple[int, int, str]]:
    """``(question_id, image_id, question)`` of a VQA questions file, in file order."""
    source = Path(path)
    out: list[tuple[int, int, str]] = []
    for entry in _entries(_read_json(source, "--questions"), "questions", source, "--questions"):
        try:
            out.append((int(entry["question_id"]), int(entry["image_id"]),
                        str(entry["question"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"--questions file {source}: entry {dict(entry)!r} lacks a question_id, "
                "image_id or question"
            ) from exc
    return out


def read_annotations(path: str | Path) -> dict[int, tuple[str, tuple[str, ...]]]:
    """``question_id -> (multiple_choice_answer, every human answer)`` of an annotations file."""
    source = Path(path)
    entries = _entries(_read_json(source, "--annotations"), "annotations", source,
                       "--annotations")
    out: dict[int, tuple[str, tuple[str, ...]]] = {}
    for entry in entries:
        try:
            qid = int(entry["question_id"])
            answers = tuple(str(a["answer"]) for a in entry.get("answers", []))
            main = entry.get("multiple_choice_answer")
            if main is None:
                main = Counter(answers).most_common(1)[0][0]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(
                f"--annotations file {source}: entry for question "
                f"{entry.get('question_id')!r} lacks a question_id or answers"
            ) from exc
        out[qid] = (str(main), answers)
    return out


def _folder(path: str | Path, option: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{option} folder not found: {folder}")
    return folder


def index_images(folder: str | Path) -> dict[int, Path]:
    """``image_id -> path`` for the COCO-named images in ``folder``."""
    out: dict[int, Path] = {}
    for path in sorted(_folder(folder, "--images").iterdir()):
        match = _IMAGE_RE.match(path.name)
        if match and path.is_file():
            out.setdefault(int(match.group(1)), path)
    return out


def index_hat_maps(folder: str | Path) -> dict[int, tuple[Path, ...]]:
    """``question_id -> map paths`` (ordered by ``n``) for ``{question_id}_{n}.png`` files."""
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in _folder(folder, "--hat").iterdir():
        match = _HAT_RE.match(path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    return {qid: tuple(p for _, p in sorted(maps)) for qid, maps in found.items()}


def list_vqa(
    questions: str | Path,
    images: str | Path,
    *,
    annotations: str | Path | None = None,
    hat: str | Path | None = None,
) -> DatasetListing:
    """The usable questions of a VQA questions file (keys: the question ids)."""
    entries = read_questions(questions)
    image_index = index_images(images)
    answers = read_annotations(annotations) if annotations is not None else None
    maps = index_hat_maps(hat) if hat is not None else None
    skipped: Counter[str] = Counter()
    items: list[Item] = []
    seen: set[int] = set()
    for qid, image_id, text in entries:
        if qid in seen:
            skipped["duplicate question id"] += 1
            continue
        seen.add(qid)
        image = image_index.get(image_id)
        if image is None:
            skipped["no image"] += 1
            continue
        if answers is not None and qid not in answers:
            skipped["no annotation"] += 1
            continue
        if maps is not None and qid not in maps:
            skipped["no human map"] += 1
            continue
        main, given = answers[qid] if answers is not None else (None, ())
        items.append(
            Item(
                key=str(qid),
                question=text,
                image=str(image),
                answer=main,
                answers=given,
                maps=tuple(str(p) for p in maps[qid]) if maps is not None else (),
                map_kind="files" if maps is not None else "none",
            )
        )
    identity = {
        "dataset": "vqa",
        "questions": str(Path(questions).resolve()),
        "annotations": str(Path(annotations).resolve()) if annotations is not None else None,
        "images": str(Path(images).resolve()),
        "hat": str(Path(hat).resolve()) if hat is not None else None,
    }
    return DatasetListing(name="vqa", items=tuple(items), skipped=dict(skipped),
                          identity=identity)


def load_hat_map(path: str | Path, *, content: bytes | None = None) -> NDArray[np.float64]:
    """A VQA-HAT map as ``float64 H x W`` in 0-1 (grey level / 255; colour maps averaged).

    ``content``: the file's bytes, read elsewhere; ``path`` then only names it in messages.
    """
    source = Path(path)
    try:
        with Image.open(source if content is None else io.BytesIO(content)) as img:
            img.load()
            grey = img.convert("L")
    except FileNotFoundError as exc:
        raise ImageError(f"human attention map not found: {source}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read human attention map {source}: {exc}") from exc
    return np.asarray(grey, dtype=np.float64) / 255.0
