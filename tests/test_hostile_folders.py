"""Hostile ``hf:`` folders (issue 23, items 1, 7 and 9): a folder never runs its own code
nor asks on standard input, never loads with random or unused weights or without a
tokenizer, and cannot make loading hang or allocate without bound."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli

pytest.importorskip("transformers")

from hf_toys import build_vilt

QUESTION = "what color is the circle?"


@pytest.fixture(scope="module")
def vilt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vilt(tmp_path_factory.mktemp("hf") / "vilt")


def _copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def _explain(folder: Path, image: Path, out: Path) -> tuple[int, str, str]:
    return run_cli(["explain", "--model", f"hf:{folder}", "--image", str(image),
                    "--question", QUESTION, "--method", "occlusion", "--grid", "2",
                    "--out", str(out)])


def _explain_bounded(folder: Path, image: Path, out: Path) -> tuple[int, str, str]:
    """:func:`_explain` in a child process held to 8 GiB of address space and 300 s, so a
    regression (a hang, a huge allocation) fails the test instead of the machine."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    result = subprocess.run(
        [sys.executable, "-m", "blackbox_vqa", "explain", "--model", f"hf:{folder}",
         "--image", str(image), "--question", QUESTION, "--grid", "2",
         "--method", "occlusion", "--out", str(out)],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
        stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return result.returncode, result.stdout, result.stderr


def test_a_folder_with_custom_code_is_refused_and_its_code_never_runs(
    vilt_folder: Path, square_image: Path, tmp_path: Path,
) -> None:
    folder = _copy(vilt_folder, tmp_path)
    marker = tmp_path / "ran.txt"
    (folder / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import ViltConfig\n"
        "class EvilConfig(ViltConfig):\n    pass\n", encoding="utf-8")
    _edit_json(folder / "config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    # A real process with 'y' piped in: transformers would ask and read it from stdin.
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "blackbox_vqa", "explain", "--model", f"hf:{folder}",
         "--image", str(square_image), "--question", QUESTION, "--grid", "2",
         "--method", "occlusion", "--out", str(out)],
        input="y\ny\ny\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    assert "trust_remote_code=False" in result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_loading_pins_trust_remote_code_false_everywhere() -> None:
    source = (Path(__file__).resolve().parents[1] / "src" / "blackbox_vqa" / "adapters" / "hf")
    calls = 0
    for path in source.glob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if ".from_pretrained(" in line and "def " not in line:
                calls += 1
                assert path.name == "loading.py", f"{path.name}: {line.strip()}"
                # False, or the user's explicit --trust-remote-code: never left out
                assert "trust_remote_code=False" in line or \
                    "trust_remote_code=trust_remote_code" in line, line
    # config, model, processor (its tokenizer loads through it); tokenizer and image
    # processor of a processor built without its video part
    assert calls == 5


@pytest.mark.parametrize("damage", ["head", "layer", "more_layers", "extra"])
def test_missing_or_unused_weights_are_an_error_not_random_weights(
    damage: str, vilt_folder: Path, square_image: Path, tmp_path: Path,
) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(vilt_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    if damage == "head":
        weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    elif damage == "layer":
        weights = {k: v for k, v in weights.items() if ".layer.1." not in k}
    elif damage == "extra":
        weights["vilt.unused_block.weight"] = weights["classifier.0.weight"].clone()
    else:
        _edit_json(folder / "config.json", num_hidden_layers=3)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = _explain(folder, square_image, out)
    assert code == 2, err
    wanted = "not used by the architecture" if damage == "extra" else "missing"
    assert wanted in err and "weights" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("damage", ["absent", "empty"])
def test_a_folder_without_a_usable_tokenizer_is_an_error(
    damage: str, vilt_folder: Path, square_image: Path, tmp_path: Path,
) -> None:
    folder = _copy(vilt_folder, tmp_path)
    if damage == "absent":
        (folder / "tokenizer.json").unlink()
    else:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"]["vocab"] = {w: i for i, w in enumerate(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 5]
        (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    code, _, err = _explain(folder, square_image, tmp_path / "out")
    assert code == 2, err
    assert "tokenizer" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("file", "key", "value"), [
    ("config.json", "num_hidden_layers", 10_000_000),
    ("config.json", "hidden_size", 1 << 40),
    ("processor_config.json", "size", {"shortest_edge": 200_000}),
])
def test_config_numbers_that_would_allocate_gigabytes_are_refused_before_loading(
    file: str, key: str, value: object, vilt_folder: Path, square_image: Path,
    tmp_path: Path,
) -> None:
    folder = _copy(vilt_folder, tmp_path)
    path = folder / file
    if file == "processor_config.json":
        data = json.loads(path.read_text(encoding="utf-8"))
        data["image_processor"][key] = value
        path.write_text(json.dumps(data), encoding="utf-8")
    else:
        _edit_json(path, **{key: value})
    code, _, err = _explain_bounded(folder, square_image, tmp_path / "out")
    assert code == 2, err
    assert "over the most accepted" in err and file in err


def test_a_fifo_or_an_oversized_config_in_a_folder_is_refused_without_reading_it(
    vilt_folder: Path, square_image: Path, tmp_path: Path,
) -> None:
    folder = _copy(vilt_folder, tmp_path)
    (folder / "tokenizer_config.json").unlink()
    os.mkfifo(folder / "tokenizer_config.json")  # opening it to read would block forever
    code, _, err = _explain_bounded(folder, square_image, tmp_path / "out")
    assert code == 2 and "not a regular file" in err, err
    (folder / "tokenizer_config.json").unlink()
    from blackbox_vqa.bounded_files import CONFIG_LIMIT

    with (folder / "tokenizer_config.json").open("wb") as handle:
        handle.truncate(CONFIG_LIMIT + 1)  # sparse: just over the bound
    code, _, err = _explain(folder, square_image, tmp_path / "out")
    assert code == 2 and f"the most accepted is {CONFIG_LIMIT}" in err, err
