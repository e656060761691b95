"""Report views of a comparison: one image and question, or a data-set run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from blackbox_vqa.comparison import (
    ItemResult,
    ModelRun,
    best_shared_answer,
    compared_methods,
    shared_answers,
)
from blackbox_vqa.report.views import (
    AgreementView,
    ItemView,
    ModelView,
    ReportView,
    TableView,
    agreement_views,
    model_view,
)

__all__ = ["comparison_item", "comparison_report", "dataset_report"]


def _model_view(run: ModelRun, shared: Sequence[str], differ: bool) -> ModelView:
    if run.explanation is None:
        return ModelView(name=run.spec, failed=run.error or "failed")
    facts: list[tuple[str, str]] = [("answers", str(len(run.answers)))]
    best = best_shared_answer(run, shared)
    if differ and best is not None:
        facts.append(("best shared answer", f"{best[0]} {best[1]:.3f}"))
    return model_view(run.explanation, name=run.spec, unavailable=run.unavailable, facts=facts)


def _agreements(runs: Sequence[ModelRun], k: int) -> tuple[AgreementView, ...]:
    views: list[AgreementView] = []
    for method in compared_methods(runs):
        having = [run for run in runs if run.explanation is not None and any(
            m is not None for m in run.maps(method))]
        if len(having) >= 2:
            views.extend(agreement_views(method, [r.spec for r in having],
                                         [r.maps(method) for r in having], k=k))
    return tuple(views)


def comparison_item(
    runs: Sequence[ModelRun],
    question: str,
    image: NDArray[Any] | None,
    image_name: str,
    *,
    k: int = 10,
    heading: str | None = None,
) -> ItemView:
    """One image and question with every model's run and the agreement matrices."""
    ok = [run for run in runs if run.explanation is not None]
    shared = shared_answers([run.answers for run in ok])
    differ = len({frozenset(run.answers) for run in ok}) > 1 and len(shared) > 0
    return ItemView(
        question=question,
        image=image,
        image_name=image_name,
        models=tuple(_model_view(run, shared, differ) for run in runs),
        agreements=_agreements(runs, k),
        heading=heading,
    )


def _vocabulary_note(runs: Sequence[ModelRun]) -> tuple[str, ...]:
    ok = [run for run in runs if run.explanation is not None]
    if len({frozenset(run.answers) for run in ok}) <= 1:
        return ()
    shared = shared_answers([run.answers for run in ok])
    sizes = ", ".join(f"{run.spec}: {len(run.answers)}" for run in ok)
    return (
        f"The models' answer vocabularies differ ({sizes}; {len(shared)} shared by all). "
        "Answers are compared on the answers both models of a pair can give ('same "
        "answer' in the agreement); 'best shared answer' is a model's highest-scoring "
        "answer among those every model can give.",
    )


def comparison_report(
    runs: Sequence[ModelRun],
    question: str,
    image: NDArray[Any],
    image_name: str,
    *,
    k: int = 10,
    footer: Sequence[tuple[str, str]] = (),
) -> ReportView:
    """The report of ``bbvqa compare`` on one image and question."""
    return ReportView(
        title="bbvqa compare: " + " vs ".join(run.spec for run in runs),
        items=(comparison_item(runs, question, image, image_name, k=k),),
        notes=_vocabulary_note(runs),
        footer=tuple(footer),
    )


def _number(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _summary_tables(summary: Mapping[str, Any]) -> tuple[TableView, ...]:
    models = summary["models"]
    accuracy = TableView(
        "accuracy", ("model", "accuracy", "items judged", "failed runs"),
        tuple((spec, _number(m["accuracy"]), str(m["judged"]), str(m["failed"]))
              for spec, m in models.items()),
    )
    human_rows = []
    for spec, m in models.items():
        for method, est in m["human_attention"].items():
            human_rows.append((spec, method, f"{_number(est['mean'])} ± {_number(est['sem'])}",
                               str(est["n"])))
    tables = [accuracy]
    if human_rows:
        tables.append(TableView(
            "rank correlation with human attention (14x14, mean ± standard error)",
            ("model", "method", "correlation", "items"), tuple(human_rows)))
    share_rows = tuple(
        (spec, *(f"{_number(m['modality_share'][key]['mean'])} ± "
                 f"{_number(m['modality_share'][key]['sem'])}" for key in ("t_shap", "v_shap")),
         str(m["modality_share"]["t_shap"]["n"]))
        for spec, m in models.items() if m.get("modality_share"))
    if share_rows:
        tables.append(TableView(
            "modality share (MM-SHAP; mean ± standard error over items)",
            ("model", "T-SHAP (question)", "V-SHAP (image)", "items"), share_rows))
    if summary["agreement"]:
        tables.append(TableView(
            "mean agreement between models",
            ("models", "method", "items", "rank correlation", "top-k overlap",
             "same top word", "same answer"),
            tuple((f"{a['a']} / {a['b']}", a["method"], str(a["n"]),
                   _number(a["rank_correlation"]), _number(a["top_k_overlap"]),
                   _number(a["same_top_word"]), _number(a["same_answer"]))
                  for a in summary["agreement"]),
        ))
    return tuple(tables)


def dataset_report(
    title: str,
    summary: Mapping[str, Any],
    shown: Sequence[tuple[ItemResult, NDArray[Any] | None]],
    *,
    k: int = 10,
    notes: Sequence[str] = (),
    footer: Sequence[tuple[str, str]] = (),
) -> ReportView:
    """The report of ``bbvqa compare --dataset``: summary tables, then the items in
    ``shown`` (each with its pixels) in detail."""
    items = tuple(
        comparison_item(result.runs, result.question, pixels, result.image, k=k,
                        heading=f"item {result.key}"
                        + (f" (reference answer: {result.reference})" if result.reference
                           else ""))
        for result, pixels in shown
    )
    return ReportView(title=title, items=items, tables=_summary_tables(summary),
                      notes=tuple(notes), footer=tuple(footer))
