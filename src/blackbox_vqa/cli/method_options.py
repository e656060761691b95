"""The method options that ``explain``, ``compare`` and ``evaluate`` share, defined once.

:func:`with_method_options` adds ``--score``, ``--masks``, ``--incremental``,
``--ig-steps``, ``--ig-baseline``, ``--shap-grid``, ``--shap-permutations``,
``--shap-seed`` and ``--metrics`` to a command and hands it one
:class:`MethodOptions`; :meth:`MethodOptions.settings` builds the
:class:`~blackbox_vqa.explainers.registry.MethodSettings` with the command's own grid,
baseline and batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from blackbox_vqa.cli.option_groups import Parameter, option_group

__all__ = ["MethodOptions", "with_method_options"]

_PANEL = "Method options"


@dataclass(frozen=True)
class MethodOptions:
    """The shared method options' values."""

    score: str = "probability"
    masks: int = 2000
    incremental: str = "exact"
    ig_steps: int = 32
    ig_baseline: str = "black"
    shap_grid: int = 4
    shap_permutations: int = 32
    shap_seed: int = 0
    metrics: bool = False

    def settings(self, **own: Any) -> Any:
        """``MethodSettings`` from these options and the command's own (``grid``,
        ``window``, ``stride``, ``baseline``, ``batch_size``); invalid values raise
        :class:`~blackbox_vqa.errors.InputError` naming them."""
        from blackbox_vqa.explainers.registry import MethodSettings

        return MethodSettings(score=self.score, rise_masks=self.masks,
                              incremental=self.incremental, ig_steps=self.ig_steps,
                              ig_baseline=self.ig_baseline, shap_grid=self.shap_grid,
                              shap_permutations=self.shap_permutations,
                              shap_seed=self.shap_seed, **own)


_PARAMETERS: list[Parameter] = [
    ("score", Annotated[str, typer.Option(
        help="What occlusion and RISE compare: probability (the paper's) or "
        "log-probability.", rich_help_panel=_PANEL)], "probability"),
    ("masks", Annotated[int, typer.Option(help="RISE: random masks.",
                                          rich_help_panel=_PANEL)], 2000),
    ("incremental", Annotated[str, typer.Option(
        help="Occlusion on a PyTorch model: exact (compute only what each patch changes; "
        "same maps) or off.", rich_help_panel=_PANEL)], "exact"),
    ("ig_steps", Annotated[int, typer.Option(
        help="Integrated gradients: points of the path integral.",
        rich_help_panel=_PANEL)], 32),
    ("ig_baseline", Annotated[str, typer.Option(
        help="Integrated gradients: image baseline, black, blur or imagenet-mean.",
        rich_help_panel=_PANEL)], "black"),
    ("shap_grid", Annotated[int, typer.Option(
        help="MM-SHAP: image cells per side (the image players).",
        rich_help_panel=_PANEL)], 4),
    ("shap_permutations", Annotated[int, typer.Option(
        help="MM-SHAP: permutations sampled (even: antithetic pairs); about one model "
        "input per player per permutation.", rich_help_panel=_PANEL)], 32),
    ("shap_seed", Annotated[int, typer.Option(
        help="MM-SHAP: seed of the permutations.", rich_help_panel=_PANEL)], 0),
    ("metrics", Annotated[bool, typer.Option(
        "--metrics", help="Also measure each map's faithfulness: deletion/insertion AUC "
        "of image maps, comprehensiveness/sufficiency of word maps, beside random orders.",
        rich_help_panel=_PANEL)], False),
]


def with_method_options(command: Callable[..., None]) -> Callable[..., None]:
    """Decorate a Typer command that has a ``method_options: MethodOptions`` parameter."""
    return option_group(_PARAMETERS, "method_options",
                        lambda values: MethodOptions(**values))(command)
