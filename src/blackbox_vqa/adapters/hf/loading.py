"""Safe loading of ``transformers`` folders: the one place ``hf:`` adapters call
``from_pretrained``.

- ``trust_remote_code`` passed explicitly on every call (config, model, processor,
  tokenizer), ``False`` unless the user gave ``--trust-remote-code``, so transformers never
  asks on standard input whether to run a folder's own Python; without the flag a folder
  whose config or processor files name custom code (``auto_map``) is refused with one line.
- Every file of a local folder is checked before transformers opens it: regular files only
  (no FIFO, device or socket), JSON configs at most :data:`CONFIG_LIMIT` bytes and 64
  levels deep, other files at most :data:`FILE_LIMIT` bytes (weights excepted: they are
  memory-mapped). Size numbers in configs are bounded (:data:`CONFIG_BOUNDS`), so a config
  cannot make the model or the processor allocate gigabytes before the weights are read.
- Weights must match the architecture exactly: missing (randomly initialised), unused or
  mis-shaped weights are an error (exit 2), and so is a folder without a tokenizer or with
  an empty one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blackbox_vqa.bounded_files import (
    CONFIG_LIMIT,
    check_regular,
    read_json_bounded,
    read_text_bounded,
)
from blackbox_vqa.errors import InputError, ModelLoadError

__all__ = [
    "CONFIG_BOUNDS",
    "FILE_LIMIT",
    "check_folder",
    "load_config",
    "load_model",
    "load_processor",
    "processor_without_video",
]

FILE_LIMIT = 256 << 20  # a tokenizer or other non-weight file: 256 MiB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
# Largest value accepted for config keys ending so (layer counts, widths, image sides).
CONFIG_BOUNDS: dict[str, int] = {
    "layers": 1024,
    "heads": 1024,
    "size": 1 << 20,  # vocab_size, hidden_size, intermediate_size, image_size...
    "embeddings": 1 << 20,  # max_position_embeddings
    "shortest_edge": 8192,
    "longest_edge": 8192,
    "height": 8192,
    "width": 8192,
    "size_divisor": 8192,
}
_SIDE_KEYS = ("size", "image_size", "shortest_edge", "longest_edge", "height", "width", "crop_size")


def check_folder(folder: Path, *, trust_remote_code: bool = False) -> None:
    """Refuse a local model folder that could run code (unless ``trust_remote_code``), hang
    or exhaust memory (see the module doc); :class:`InputError` naming the file and what is
    wrong."""
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            continue
        what = f"model folder file {path.name!r}:"
        info = check_regular(path, "model folder file")
        if path.name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        if path.name.lower().endswith(("config.json", "special_tokens_map.json")):
            data = read_json_bounded(path, limit=CONFIG_LIMIT, what="model config")
            if not trust_remote_code:
                _refuse_remote_code(data, path)
            _check_bounds(data, path)
        elif info.st_size > FILE_LIMIT:
            raise InputError(f"{what} {info.st_size} bytes; the most accepted is {FILE_LIMIT}")


def _refuse_remote_code(data: Any, path: Path) -> None:
    if isinstance(data, dict) and any(k in data for k in ("auto_map", "custom_pipelines")):
        raise InputError(
            f"{path} asks to run the folder's own Python code (auto_map); hf: models load "
            "with trust_remote_code=False and never run a folder's code (pass "
            "--trust-remote-code for a folder you trust)"
        )


def _walk(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _walk(value, str(key))
    elif isinstance(data, list):
        for value in data:
            yield from _walk(value, prefix)
    else:
        yield prefix, data


def _check_bounds(data: Any, path: Path) -> None:
    for key, value in _walk(data):
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        bound = next((b for suffix, b in CONFIG_BOUNDS.items() if key.endswith(suffix)), None)
        if key in _SIDE_KEYS or key.endswith("_image_size"):
            bound = 8192
        if bound is not None and value > bound:
            raise InputError(f"{path}: {key} = {value} is over the most accepted ({bound})")


def _local(location: str) -> Path | None:
    path = Path(location)
    return path if path.is_dir() else None


def load_config(location: str, *, trust_remote_code: bool = False) -> Any:
    """``AutoConfig.from_pretrained`` after :func:`check_folder`; remote code only when
    ``trust_remote_code``."""
    import transformers

    folder = _local(location)
    if folder is not None:
        check_folder(folder, trust_remote_code=trust_remote_code)
    auto: Any = transformers.AutoConfig
    return auto.from_pretrained(location, trust_remote_code=trust_remote_code)


def load_model(model_cls: Any, location: str, *, trust_remote_code: bool = False) -> Any:
    """``model_cls.from_pretrained`` (remote code only when ``trust_remote_code``);
    :class:`InputError` when a weight is missing (it would be random), unused or of the
    wrong shape."""
    model, info = model_cls.from_pretrained(location, trust_remote_code=trust_remote_code,
                                            output_loading_info=True)
    for key, label in (("missing_keys", "missing (they would be random)"),
                       ("unexpected_keys", "not used by the architecture"),
                       ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                            else "")
            raise InputError(f"{location}: {len(names)} weights {label}: {shown}")
    if info.get("error_msgs"):
        raise ModelLoadError(f"{location}: {str(info['error_msgs'][0]).splitlines()[0]}")
    return model


def load_processor(location: str, *, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor.from_pretrained`` (remote code only when ``trust_remote_code``);
    :class:`InputError` for a folder without a tokenizer file or whose tokenizer holds no
    ordinary word. A processor that transformers cannot build for want of torchvision (the
    video processor of video-capable models) is built for images alone
    (:func:`processor_without_video`)."""
    import transformers

    folder = _local(location)
    if folder is not None and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise InputError(f"{location}: no tokenizer ({', '.join(TOKENIZER_FILES)}); save "
                         "the processor with its tokenizer (processor.save_pretrained)")
    auto: Any = transformers.AutoProcessor
    try:
        processor = auto.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (AttributeError, ImportError) as exc:  # video support needs torchvision
        if folder is None or ("orchvision" not in str(exc) and "_extra_content" not in str(exc)):
            raise
        processor = processor_without_video(folder)
    tokenizer = getattr(processor, "tokenizer", processor)
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        words = len(tokenizer) - len(special)
    except TypeError:
        words = 1
    if words <= 0:
        raise InputError(f"{location}: the tokenizer is empty (only special tokens); every "
                         "word would be unknown")
    return processor


def processor_without_video(folder: Path) -> Any:
    """The folder's processor built without its video processor.

    transformers cannot build the processors of video-capable models (Qwen2-VL...) without
    torchvision (their video processor class is missing); images need none of it, so the
    processor class is built from its tokenizer, image processor and chat template alone.
    """
    import transformers

    hf: Any = transformers
    config: dict[str, Any] = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            loaded = read_json_bounded(path, limit=CONFIG_LIMIT, what="processor config")
            config = {**(loaded if isinstance(loaded, dict) else {}), **config}
    cls_name = str(config.get("processor_class", ""))
    base = getattr(hf, cls_name, None)
    if base is None:
        raise ModelLoadError(f"cannot load {str(folder)!r}: no processor class {cls_name!r}")

    class _ImagesOnly(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = hf.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    images = hf.AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = read_text_bounded(jinja, limit=FILE_LIMIT, what="chat template")
    template = template or config.get("chat_template") or getattr(tokenizer, "chat_template",
                                                                   None)
    _ImagesOnly.__name__ = base.__name__
    return _ImagesOnly(image_processor=images, tokenizer=tokenizer, video_processor=None,
                       chat_template=template)


def folder_of(location: str | os.PathLike[str]) -> Path | None:
    """The local folder ``location`` names, or None for a hub id."""
    return _local(os.fspath(location))
