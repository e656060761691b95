"""Turning a run's item records into the three analyses, as JSON-ready data and Markdown.

``summarize`` computes: the model's accuracy; per method, the rank correlation with human
(or ground-truth) attention beside the random baseline and inter-human agreement (an
item's value is the mean over its human maps); words by part of speech; and failure
prediction from occlusion features. ``markdown`` renders the same numbers as tables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from blackbox_vqa.evaluation.failure import occlusion_features, predict_failure
from blackbox_vqa.evaluation.human_attention import Estimate, mean_sem
from blackbox_vqa.evaluation.pos import PosResult, Tagger, importance_by_tag, top_tags
from blackbox_vqa.evaluation.runstore import ItemRecord
from blackbox_vqa.text import split_words

__all__ = [
    "RESULTS_SCHEMA",
    "human_attention_table",
    "markdown",
    "modality_table",
    "pos_results",
    "summarize",
]

RESULTS_SCHEMA = "blackbox_vqa.evaluation/1"


def _item_mean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else float("nan")


def human_attention_table(records: Sequence[ItemRecord], methods: Sequence[str]) -> dict[str, Any]:
    """``{method: Estimate, "random": ..., "inter-human": ...}`` over records with maps."""
    with_maps = [r for r in records if r.meta["human"]["maps"] > 0]
    table: dict[str, Estimate] = {}
    for name in methods:
        table[name] = mean_sem(_item_mean(r.meta["human"]["correlations"][name])
                               for r in with_maps if name in r.meta["human"]["correlations"])
    table["random"] = mean_sem(_item_mean(r.meta["human"]["random"]) for r in with_maps)
    several = [r for r in with_maps if r.meta["human"]["maps"] > 1]
    if several:
        table["inter-human"] = mean_sem(
            r.meta["human"]["inter_human"] if r.meta["human"]["inter_human"] is not None
            else float("nan") for r in several
        )
    return {"items": len(with_maps), "maps": sum(r.meta["human"]["maps"] for r in with_maps),
            "rows": {k: v.to_dict() for k, v in table.items()}}


def pos_results(
    records: Sequence[ItemRecord], methods: Sequence[str], tagger: Tagger
) -> tuple[list[tuple[str, int]], dict[str, PosResult]]:
    """Top tags (with counts) and each method's ``P(most important | tag)``."""
    tagged = [tagger.tag(split_words(r.meta["question"])) for r in records]
    tags = top_tags(tagged)
    results = {
        name: importance_by_tag(tagged, [r.arrays.get(f"{name}.words") for r in records],
                                [t for t, _ in tags])
        for name in methods
    }
    return tags, results


def _failure(records: Sequence[ItemRecord], folds: int, seed: int) -> dict[str, Any]:
    usable = [r for r in records
              if r.meta["correct"] is not None and "occlusion" in r.meta["methods"]]
    if not usable:
        return {"reason": "needs occlusion results and items with a reference answer"}
    features = []
    for r in usable:
        stats = r.meta["methods"]["occlusion"]["stats"]
        features.append(occlusion_features(
            image_map=r.arrays["occlusion.image"], word_map=r.arrays["occlusion.words"],
            image_flips=int(stats["image_flips"]), word_flips=int(stats["word_flips"]),
            probability=r.meta["probability"], margin=r.meta["margin"],
            entropy=r.meta["entropy"],
        ))
    labels = [bool(r.meta["correct"]) for r in usable]
    return predict_failure(features, labels, folds=folds, seed=seed).to_dict()


def _accuracy(done: Sequence[ItemRecord]) -> dict[str, Any]:
    judged = [r.meta["correct"] for r in done if r.meta["correct"] is not None]
    vqa = [r.meta["vqa_accuracy"] for r in done if r.meta.get("vqa_accuracy") is not None]
    return {
        "judged": len(judged),
        "accuracy": float(np.mean(judged)) if judged else None,
        "vqa_accuracy": float(np.mean(vqa)) if vqa else None,
    }


def _timing(done: Sequence[ItemRecord], methods: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ["predict", *methods, "total"]:
        values = [r.meta["seconds"][name] for r in done if name in r.meta["seconds"]]
        if values:
            out[f"{name}_s_mean"] = float(np.mean(values))
    return out


def summarize(
    records: Sequence[ItemRecord],
    *,
    settings: Mapping[str, Any],
    dataset_skipped: Mapping[str, int],
    tagger: Tagger,
    folds: int,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results document (schema ``blackbox_vqa.evaluation/1``)."""
    done = [r for r in records if r.meta["status"] == "done"]
    skipped = Counter(str(r.meta["reason"]) for r in records if r.meta["status"] != "done")
    requested = list(settings["methods"])
    unavailable: dict[str, str] = {}
    for r in done:
        unavailable.update(r.meta["unavailable"])
    methods = [m for m in requested if m not in unavailable]
    tags, pos = pos_results(done, methods, tagger)
    return {
        "schema": RESULTS_SCHEMA,
        "settings": dict(settings),
        "items": {"planned": len(records), "evaluated": len(done),
                  "skipped_in_run": dict(skipped), "skipped_in_dataset": dict(dataset_skipped)},
        "methods": {m: {"available": m not in unavailable, "reason": unavailable.get(m)}
                    for m in requested},
        "accuracy": _accuracy(done),
        "human_attention": human_attention_table(done, methods),
        "pos": {"tagger": tagger.name, "tags": [{"tag": t, "count": c} for t, c in tags],
                "methods": {m: r.to_dict() for m, r in pos.items()}},
        "failure_prediction": _failure(done, folds, int(settings.get("seed", 0))),
        "faithfulness": faithfulness_table(done, methods),
        "sanity": sanity_table(done, methods),
        "modality_share": modality_table(done, methods),
        "timing": {**_timing(done, methods), **dict(run or {})},
    }


FAITHFULNESS_KEYS = ("deletion_auc", "random_deletion_auc", "insertion_auc",
                     "random_insertion_auc", "comprehensiveness", "random_comprehensiveness",
                     "sufficiency", "random_sufficiency")


def faithfulness_table(records: Sequence[ItemRecord], methods: Sequence[str]) -> dict[str, Any]:
    """Per method, each faithfulness number's mean and standard error over the items that
    have it, and the mean resampled curves (for ``deletion.png``)."""
    from blackbox_vqa.evaluation.metrics import mean_curves

    having = [r for r in records if r.meta.get("faithfulness")]
    table: dict[str, Any] = {}
    for name in methods:
        rows = [r.meta["faithfulness"][name] for r in having
                if name in r.meta["faithfulness"]]
        if not rows:
            continue
        entry: dict[str, Any] = {
            key: mean_sem(float("nan") if row.get(key) is None else row[key]
                          for row in rows).to_dict()
            for key in FAITHFULNESS_KEYS if any(key in row for row in rows)}
        entry["evaluations_mean"] = float(np.mean([row.get("evaluations", 0) for row in rows]))
        curves = mean_curves([{k[len("faith."):]: v for k, v in r.arrays.items()
                               if k.startswith("faith.")} for r in having], name)
        entry["curves"] = {k: v.tolist() for k, v in curves.items()}
        table[name] = entry
    return {"items": len(having), "methods": table}


def sanity_table(records: Sequence[ItemRecord], methods: Sequence[str]) -> dict[str, Any]:
    """Per method: the mean rank correlation after each randomised layer, the final one
    (mean +- s.e.) and the share of items below the threshold (0.5)."""
    from blackbox_vqa.evaluation.sanity import DEFAULT_THRESHOLD

    having = [r for r in records if r.meta.get("sanity")]
    table: dict[str, Any] = {}
    for name in methods:
        series = [r.meta["sanity"][name] for r in having if name in r.meta["sanity"]]
        if not series:
            continue
        depth = min(len(s) for s in series)
        values = np.array([[np.nan if v is None else v for v in s[:depth]] for s in series])
        final = values[:, -1]
        table[name] = {
            "items": len(series),
            "per_layer": [None if not np.isfinite(v) else float(v)
                          for v in np.nanmean(values, axis=0)] if depth else [],
            "final": mean_sem(final).to_dict(),
            "passing": float(np.mean(~(final >= DEFAULT_THRESHOLD))),
            "threshold": DEFAULT_THRESHOLD,
        }
    return {"items": len(having), "methods": table}


SHARE_KEYS = ("t_shap", "v_shap", "t_shap_se", "evaluations")


def modality_table(records: Sequence[ItemRecord], methods: Sequence[str]) -> dict[str, Any]:
    """Per method that reports modality shares (MM-SHAP): T-SHAP, V-SHAP, the items' own
    s.e. of T-SHAP and the inputs scored, each as mean and standard error over the items
    (an item whose T-SHAP is undefined, every Shapley value 0, counts as undefined)."""
    table: dict[str, Any] = {}
    for name in methods:
        rows = [r.meta["methods"][name]["stats"] for r in records
                if name in r.meta["methods"]]
        if not any("t_shap_defined" in row for row in rows):
            continue
        table[name] = {key: mean_sem(row.get(key, float("nan")) for row in rows).to_dict()
                       for key in SHARE_KEYS}
    return {"methods": table}


def markdown_modality(table: Mapping[str, Any]) -> list[str]:
    """The modality-share table (empty when MM-SHAP did not run)."""
    if not table.get("methods"):
        return []
    lines = ["", "## Modality share (MM-SHAP)", "",
             "T-SHAP: the question words' share of the summed |Shapley values|, V-SHAP = "
             "1 - T-SHAP; mean ± s.e. over items (the last columns: the mean of each item's "
             "own s.e. of T-SHAP, and of the model inputs scored per item).", "",
             "| method | T-SHAP | V-SHAP | items | undefined | item s.e. of T-SHAP "
             "| model inputs |", "|---|---|---|---|---|---|---|"]
    for name, entry in table["methods"].items():
        t = entry["t_shap"]
        lines.append(f"| {name} | {_estimate(entry, 't_shap')} | {_estimate(entry, 'v_shap')} "
                     f"| {t['n']} | {t['undefined']} | {_fmt(entry['t_shap_se']['mean'])} "
                     f"| {_fmt(entry['evaluations']['mean'], 0)} |")
    return lines


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown tables."""
    s = results["settings"]
    lines = [
        f"# Evaluation of `{s['model']}` on `{s['dataset']['dataset']}`", "",
        f"Methods: {', '.join(s['methods'])}; items evaluated: "
        f"{results['items']['evaluated']} of {results['items']['planned']}; seed {s['seed']}.",
    ]
    for name, info in results["methods"].items():
        if not info["available"]:
            lines.append(f"- `{name}` not available: {info['reason']}")
    for title, counts in (("skipped in the data set", results["items"]["skipped_in_dataset"]),
                          ("skipped in the run", results["items"]["skipped_in_run"])):
        if counts:
            lines.append(f"- {title}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    acc = results["accuracy"]
    lines += ["", f"Model accuracy: {_fmt(acc['accuracy'])} over {acc['judged']} items"
              + (f" (VQA accuracy {_fmt(acc['vqa_accuracy'])})" if acc["vqa_accuracy"] is not None
                 else "") + "."]
    lines += ["", *markdown_human(results["human_attention"])]
    lines += ["", *markdown_pos(results["pos"])]
    lines += ["", *markdown_failure(results["failure_prediction"])]
    lines += markdown_faithfulness(results.get("faithfulness") or {})
    lines += markdown_sanity(results.get("sanity") or {})
    lines += markdown_modality(results.get("modality_share") or {})
    return "\n".join(lines) + "\n"


def _estimate(entry: Mapping[str, Any], key: str) -> str:
    found = entry.get(key)
    if not found or found.get("mean") is None:
        return "-"
    return f"{found['mean']:.3f} ± {_fmt(found.get('sem'))}"


def markdown_faithfulness(table: Mapping[str, Any]) -> list[str]:
    """The faithfulness table (empty without ``--metrics``)."""
    if not table.get("methods"):
        return []
    lines = ["", "## Faithfulness (deletion / insertion AUC, comprehensiveness / sufficiency)",
             "", f"{table['items']} items; mean ± s.e.; 'random' is a random order's.", "",
             "| method | deletion | random | insertion | random | comprehensiveness | random "
             "| sufficiency | random |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in table["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_estimate(entry, key)
                                                 for key in FAITHFULNESS_KEYS) + " |")
    return lines


def markdown_sanity(table: Mapping[str, Any]) -> list[str]:
    """The randomisation sanity table (empty without ``--sanity``)."""
    if not table.get("methods"):
        return []
    lines = ["", "## Sanity check (model-parameter randomisation, Adebayo et al. 2018)", "",
             f"{table['items']} items; Spearman rank correlation of |map| with the original "
             "after randomising every layer (output first); a method passes below 0.5.", "",
             "| method | items | rank corr. after all layers | items passing |",
             "|---|---|---|---|"]
    for name, entry in table["methods"].items():
        lines.append(f"| {name} | {entry['items']} | {_estimate(entry, 'final')} | "
                     f"{entry['passing']:.2f} |")
    return lines


def markdown_human(table: Mapping[str, Any]) -> list[str]:
    """Rank correlation with human attention, as a Markdown table."""
    lines = ["## Rank correlation with human attention (14 x 14, Spearman)", ""]
    if table["items"] == 0:
        return [*lines, "No human or ground-truth attention maps in this data set."]
    lines += [f"{table['items']} items, {table['maps']} maps.", "",
              "| map | mean | standard error | n | undefined |", "| --- | --- | --- | --- | --- |"]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | {_fmt(row['mean'])} | {_fmt(row['sem'])} | {row['n']} | "
                     f"{row['undefined']} |")
    return lines


def markdown_pos(pos: Mapping[str, Any]) -> list[str]:
    """P(most important word | tag), as a Markdown table."""
    methods = list(pos["methods"])
    lines = ["## Most important word by part of speech", "",
             f"Tagger: {pos['tagger']}. P(word is the most important of its question | tag); "
             "chance = a word picked at random.", "",
             "| tag | words | " + " | ".join(methods) + " | chance |",
             "| --- | --- | " + " | ".join("---" for _ in methods) + " | --- |"]
    for row in pos["tags"]:
        tag = row["tag"]
        values = [_fmt(pos["methods"][m]["probability"][tag]) for m in methods]
        chance = next((pos["methods"][m]["chance"][tag] for m in methods), None)
        lines.append(f"| {tag} | {row['count']} | " + " | ".join(values) + f" | {_fmt(chance)} |")
    for m in methods:
        lines.append(f"\n{m}: {pos['methods'][m]['questions']} questions used, "
                     f"{pos['methods'][m]['uninformative']} left out (all words tied).")
    return lines


def markdown_failure(failure: Mapping[str, Any]) -> list[str]:
    """Cross-validated failure prediction, as a Markdown table."""
    lines = ["## Predicting failure from occlusion", ""]
    if failure.get("reason"):
        return [*lines, f"Not computed: {failure['reason']}."]
    lines += [f"{failure['n']} items ({failure['correct']} answered right), "
              f"{failure['folds']}-fold stratified cross-validation.", "",
              "| predictor | accuracy | ± std | balanced accuracy | ROC AUC |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in failure["scores"].items():
        lines.append(f"| {name} | {_fmt(row['accuracy'])} | {_fmt(row['accuracy_std'])} | "
                     f"{_fmt(row['balanced_accuracy'])} | {_fmt(row['roc_auc'])} |")
    return lines
