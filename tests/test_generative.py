"""Generative VLMs behind hf: (tiny random-weight LLaVA, Idefics3 and PaliGemma folders built
offline by genvlm_toys): the explained answer is the model's greedy one, scores are the
exact teacher-forced sequence probability (checked against direct transformers calls),
batching changes nothing, and the commands run on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run_cli

pytest.importorskip("transformers")

import torch

from blackbox_vqa.adapters.hf.generative import OTHER, GenerativeAdapter
from blackbox_vqa.explain import explain
from genvlm_toys import build, direct_token_logprobs, image

TESTED = ("llava", "qwen2vl", "idefics3", "paligemma")
QUESTION = "what color is the shape"


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genvlm")
    return {family: build(family, root / family) for family in TESTED}


@pytest.fixture(scope="session")
def adapters(folders: dict[str, Path]) -> dict[str, GenerativeAdapter]:
    return {f: GenerativeAdapter.from_pretrained(p, max_tokens=3, device="cpu")
            for f, p in folders.items()}


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    Image.fromarray(image(3, 40)).save(path)
    return path


def _direct(adapter: GenerativeAdapter, pixels: np.ndarray, question: str,
            answer: list[int]) -> float:
    """log p(answer | image, question) straight from transformers (see
    :func:`genvlm_toys.direct_token_logprobs`)."""
    return float(sum(direct_token_logprobs(adapter.module, adapter.processor, pixels,
                                           question, answer)))


@pytest.mark.parametrize("family", TESTED)
def test_explained_answer_is_the_greedy_generation(
    family: str, adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters[family]
    pixels = image(3, 40)
    adapter._prepared = None
    adapter.prepare(pixels, QUESTION)
    processor = adapter.processor
    prompt = adapter.prompts(QUESTION)
    inputs = processor(text=[prompt], images=[[pixels]], return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        out = adapter.module.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(adapter.eos_ids)
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    expected = new if stop is None else new[: stop + 1]
    assert list(adapter.answer_ids) == expected
    assert adapter.answers[0] == processor.tokenizer.decode(
        new if stop is None else new[:stop], skip_special_tokens=True).strip()
    assert adapter.answers[1] == OTHER
    assert adapter.eos_included == (stop is not None)
    # another image gives another answer or at least another probability
    other = adapter.answer_probs(image(9, 40), QUESTION)[0]
    assert other != pytest.approx(adapter.answer_probs(pixels, QUESTION)[0], rel=1e-3)


@pytest.mark.parametrize("family", TESTED)
def test_scores_equal_direct_teacher_forcing(
    family: str, adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters[family]
    pixels = image(3, 40)
    adapter._prepared = None
    adapter.prepare(pixels, QUESTION)
    inputs = [(image(i, 40).astype(np.float32) + 0.25, q) for i, q in
              enumerate([QUESTION, "how many shapes", "is it red", "what is the man holding"])]
    found = adapter.answer_probs_batch([p for p, _ in inputs], [q for _, q in inputs])
    for (p, q), row in zip(inputs, found, strict=True):
        direct = _direct(adapter, p, q, list(adapter.answer_ids))
        assert np.log(row[0]) == pytest.approx(direct, abs=1e-5)
        assert row[1] == pytest.approx(1 - np.exp(direct), abs=1e-9)


@pytest.mark.parametrize("family", TESTED)
def test_maps_equal_direct_computation_and_batching_changes_nothing(
    family: str, adapters: dict[str, GenerativeAdapter]
) -> None:
    adapter = adapters[family]
    pixels = image(3, 40).astype(np.float32)
    adapter._prepared = None
    runs = {}
    for size in (1, 5, 64):
        adapter.batch_size = size
        runs[size] = explain(adapter, pixels, QUESTION, methods="occlusion", grid=3,
                             baseline="0,0,0", score="log-probability", batch_size=size)
    adapter.batch_size = 16
    first = runs[1].attribution("occlusion")
    for other in (runs[5], runs[64]):
        found = other.attribution("occlusion")
        np.testing.assert_allclose(found.image_map, first.image_map, atol=1e-5, rtol=0)
        np.testing.assert_allclose(found.word_map, first.word_map, atol=1e-5, rtol=0)
    answer = list(adapter.answer_ids)
    base = _direct(adapter, pixels, QUESTION, answer)
    assert np.log(runs[1].probability) == pytest.approx(base, abs=1e-5)
    edges = [40 * k // 3 for k in range(4)]  # cell (r, c): rows floor(r*H/g)..
    for r in range(3):
        for c in range(3):
            occluded = pixels.copy()
            occluded[edges[r]:edges[r + 1], edges[c]:edges[c + 1]] = 0
            expected = base - _direct(adapter, occluded, QUESTION, answer)
            assert first.image_map[r][c] == pytest.approx(expected, abs=1e-5)
    words = QUESTION.split()
    for i in range(len(words)):
        dropped = " ".join(words[:i] + words[i + 1:])
        expected = base - _direct(adapter, pixels, dropped, answer)
        assert first.word_map[i] == pytest.approx(expected, abs=1e-5)
    assert np.abs(first.image_map).max() > 1e-3  # the map is not flat


@pytest.mark.parametrize("family", TESTED)
def test_explain_through_the_cli(
    family: str, folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli([
        "explain", "-m", f"hf:{folders[family]}", "-i", str(picture), "-q", QUESTION,
        "--grid", "3", "--max-tokens", "3", "--threads", "1", "--out", str(out)])
    assert code == 0, err
    assert "answer flips" in stdout
    doc = json.loads((out / "explanation.json").read_text())
    semantics = doc["score_semantics"]
    assert semantics["kind"] == "sequence"
    assert doc["answer"] != OTHER and doc["predicted_answer"] == doc["answer"]
    assert 1 <= len(semantics["answer_tokens"]) <= 4
    assert len(doc["occlusion"]["image"]) == 3
    assert (out / "report.html").is_file()


def test_the_terminal_shows_a_tiny_sequence_probability(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    """An 8-token answer of a random model has p ~ 1e-9: the terminal shows it and its
    drops in 3 significant digits (not 0.0000), its log, no "next" answers (a sequence
    score has none but "(other)"), and suggests --score log-probability; the report
    likewise (no "top answers"); with that score the tables say "drop in log p" and the
    note is gone."""
    out = tmp_path / "tiny-p"
    code, stdout, err = run_cli([
        "explain", "-m", f"hf:{folders['llava']}", "-i", str(picture), "-q", QUESTION,
        "--grid", "2", "--max-tokens", "8", "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    p = doc["probability"]
    assert 0 < p < 1e-3
    text = " ".join(stdout.split())
    assert f"(p = {p:.3g}, log p = {np.log(p):.4f})" in text
    assert "next:" not in text
    assert "--score log-probability compares log-likelihoods instead" in text
    words = doc["occlusion"]["words"]
    assert max(abs(v) for v in words) < 1e-3
    for value in words:
        assert f"{value:+.3e}" in text
    assert "+0.0000" not in text
    report = (out / "report.html").read_text()  # its facts: p with its log, no ranking
    assert f"<dd>{p:.3g} (log {np.log(p):.4f})</dd>" in report
    assert "<dt>top answers</dt>" not in report

    out = tmp_path / "tiny-logp"
    code, stdout, err = run_cli([
        "explain", "-m", f"hf:{folders['llava']}", "-i", str(picture), "-q", QUESTION,
        "--grid", "2", "--max-tokens", "8", "--score", "log-probability", "--threads", "1",
        "--out", str(out)])
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "drop in log p" in text and "compares log-likelihoods" not in text
    for value in json.loads((out / "explanation.json").read_text())["occlusion"]["words"]:
        assert f"{value:+.4f}" in text


def test_given_answer_and_prompt_through_the_cli(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "given"
    code, _, err = run_cli([
        "explain", "-m", f"hf:{folders['llava']}", "-i", str(picture), "-q", QUESTION,
        "--grid", "2", "--answer", "red circle", "--prompt", "Answer briefly: {question}",
        "--score", "log-probability", "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "explanation.json").read_text())
    assert doc["answer"] == "red circle"
    assert doc["score_semantics"]["eos_included"] is True
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], answer="red circle",
                                                prompt="Answer briefly: {question}",
                                                device="cpu")
    pixels = np.asarray(Image.open(picture).convert("RGB"))
    expected = adapter.sequence_logprob(pixels, QUESTION)
    assert np.log(doc["probability"]) == pytest.approx(expected, abs=1e-6)
    tokenizer = adapter.tokenizer
    ids = tokenizer("red circle", add_special_tokens=False)["input_ids"]
    assert list(adapter.answer_ids) == [*ids, tokenizer.eos_token_id]


def test_compare_judges_free_text_answers_by_their_text(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    """Two generative models' answer lists are ``[their answer, "(other)"]``: the
    placeholder is never a shared answer, and 'same answer' compares the answers' texts
    (a copy of a model agrees with it, another model does not); with ``--answer`` the
    models' own answers are unknown, so it is not judged."""
    import shutil

    from blackbox_vqa.text import normalise_answer

    twin = tmp_path / "llava-twin"
    shutil.copytree(folders["llava"], twin)
    specs = [f"hf:{folders['llava']}", f"hf:{twin}", f"hf:{folders['qwen2vl']}"]
    out = tmp_path / "cmp-free"
    code, stdout, err = run_cli([
        "compare", *[x for spec in specs for x in ("-m", spec)], "-i", str(picture),
        "-q", QUESTION, "--grid", "2", "--max-tokens", "3", "--methods", "occlusion",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "comparison.json").read_text())
    assert OTHER not in doc["shared_answers"]
    answers = {m["spec"]: m["answer"] for m in doc["models"]}
    assert answers[specs[0]] == answers[specs[1]]
    assert normalise_answer(answers[specs[0]]) != normalise_answer(answers[specs[2]])
    judged = {(p["a"], p["b"]): p["same_answer"] for p in doc["agreement"]}
    assert judged == {(specs[0], specs[1]): True, (specs[0], specs[2]): False,
                      (specs[1], specs[2]): False}
    assert "free-text answers" in " ".join(stdout.split())

    out = tmp_path / "cmp-given"
    code, _, err = run_cli([
        "compare", "-m", specs[0], "-m", specs[2], "-i", str(picture), "-q", QUESTION,
        "--grid", "2", "--answer", "red", "--methods", "occlusion", "--threads", "1",
        "--out", str(out)])
    assert code == 0, err
    doc = json.loads((out / "comparison.json").read_text())
    assert [p["same_answer"] for p in doc["agreement"]] == [None]


def test_serve_refuses_a_generative_model_unless_its_answer_is_fixed(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """A generative model's answer list is its own answer on the input it was prepared
    for: ``bbvqa serve`` (one list for every input) refuses it with one line and exit 2;
    with a chosen answer the list is fixed and the app is built."""
    pytest.importorskip("fastapi")
    from blackbox_vqa.errors import NotSupportedError
    from blackbox_vqa.server.app import create_app

    code, _, err = run_cli(["serve", "--model", f"hf:{folders['llava']}", "--port", "0"])
    assert code == 2
    assert err.count("\n") == 1 and "cannot be served: its answer list follows" in err
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], max_tokens=2, device="cpu")
    with pytest.raises(NotSupportedError):
        create_app(adapter)
    adapter.choose_answer("red")
    assert not adapter.answers_follow_input
    create_app(adapter)


def test_export_refuses_a_generative_model_in_one_line(folders: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    code, _, err = run_cli(["export", "--model", f"hf:{folders['llava']}", "--out", str(out)])
    assert code == 2
    assert err.count("\n") == 1 and "is a generative model" in err
    assert not out.exists()


def test_compare_and_evaluate_run_generative_models(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    from hf_toys import build_vilt

    vilt = build_vilt(tmp_path / "vilt")
    out = tmp_path / "cmp"
    code, _, err = run_cli([
        "compare", "-m", f"hf:{vilt}", "-m", f"hf:{folders['llava']}",
        "-m", f"hf:{folders['paligemma']}",
        "-i", str(picture), "-q", QUESTION, "--grid", "2", "--max-tokens", "2",
        "--threads", "1", "--out", str(out)])
    assert code == 0, err
    assert (out / "report.html").is_file()
    report = (out / "report.html").read_text()
    assert f"hf:{folders['paligemma']}" in report and f"hf:{vilt}" in report

    from vqa_fixture import build_vqa_fixture

    fx = build_vqa_fixture(tmp_path / "data")
    run = tmp_path / "run"
    code, stdout, err = run_cli(["evaluate", "--model", f"hf:{folders['idefics3']}",
                                 *fx.options(), "--grid", "2", "--max-tokens", "2",
                                 "--threads", "1", "--out", str(run)])
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["items"]["evaluated"] == 2
    row = results["human_attention"]["rows"]["occlusion"]
    assert row["n"] == 2 and row["mean"] is not None
    assert "| occlusion |" in stdout


@pytest.mark.parametrize(
    ("args", "message", "exit_code"),
    [
        (["--answer", "red <image>"], "cannot encode", 2),
        (["--prompt", "no placeholder"], "{question}", 2),
        (["--max-tokens", "0"], "max-tokens", 2),
    ],
)
def test_bad_input_one_line(
    args: list[str], message: str, exit_code: int, folders: dict[str, Path], picture: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "bad"
    code, _, err = run_cli([
        "explain", "-m", f"hf:{folders['llava']}", "-i", str(picture), "-q", QUESTION,
        "--grid", "2", *args, "--out", str(out)])
    assert code == exit_code, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_folder_without_chat_template_or_known_format_is_refused(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(folders["llava"], folder)
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "processor_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "processor_config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    code, _, err = run_cli(["explain", "-m", f"hf:{folder}", "-i", str(picture), "-q",
                            QUESTION, "--out", str(tmp_path / "o")])
    assert code == 2, err
    assert "no chat template" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_remote_code_is_refused_without_the_flag(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(folders["llava"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    code, _, err = run_cli(["explain", "-m", f"hf:{folder}", "-i", str(picture), "-q",
                            QUESTION, "--out", str(tmp_path / "o")])
    assert code == 2, err
    assert "--trust-remote-code" in err and "remote code ran" not in err
    assert not (tmp_path / "o").exists()


def test_answer_longer_than_the_context_is_refused(
    folders: dict[str, Path]
) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders["llava"], device="cpu",
                                                answer=" ".join(["red"] * 600))
    from blackbox_vqa.errors import InputError

    with pytest.raises(InputError, match="context of 512 positions"):
        adapter.answer_probs(image(0, 40), QUESTION)


def test_image_the_processor_rejects(folders: dict[str, Path]) -> None:
    adapter = GenerativeAdapter.from_pretrained(folders["qwen2vl"], device="cpu")
    from blackbox_vqa.errors import ImageError

    with pytest.raises(ImageError, match=r"rejects the image \(2x900x3\): absolute aspect ratio"):
        adapter.answer_probs(np.zeros((2, 900, 3), dtype=np.uint8), QUESTION)


def test_every_documented_command_runs(
    folders: dict[str, Path], picture: Path, tmp_path: Path
) -> None:
    """Each ``bbvqa`` line of docs/models/generative.md and of the README's section, on the
    tiny models (smaller grid and answers, to be fast)."""
    import re
    import shlex

    from vqa_fixture import build_vqa_fixture

    from hf_toys import build_vilt

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "models" / "generative.md").read_text()
    readme = (root / "README.md").read_text().split("## Generative vision-language models")[1]
    readme = readme.split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", page + readme, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines()
                if line.startswith("bbvqa ")]
    assert len(commands) == 11
    fx = build_vqa_fixture(tmp_path / "data")
    paths = {"models/llava": folders["llava"], "models/qwen2vl": folders["qwen2vl"],
             "models/smolvlm": folders["idefics3"], "models/paligemma": folders["paligemma"],
             "models/vilt": build_vilt(tmp_path / "vilt"), "cat.png": picture,
             "q.json": fx.questions, "a.json": fx.annotations, "img/": fx.images,
             "hat/": fx.hat}
    for number, command in enumerate(commands):
        args = [str(paths.get(a, a)) if not a.startswith("hf:") else
                f"hf:{paths[a[3:]]}" for a in shlex.split(command)[1:]]
        out = tmp_path / f"out{number}"
        code, _, err = run_cli([*args, "--grid", "2", "--threads", "1", "--out", str(out)])
        assert code == 0, f"{command}\n{err}"
        assert out.is_dir()


def test_trust_remote_code_is_only_for_hf_models(picture: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(["explain", "-m", "easyvqa", "-i", str(picture), "-q", QUESTION,
                            "--trust-remote-code", "--out", str(tmp_path / "o")])
    assert code == 2, err
    assert "--trust-remote-code: only for hf: models" in err
    assert not (tmp_path / "o").exists()
