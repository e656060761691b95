"""The method options that ``explain``, ``compare`` and ``evaluate`` share, defined once.

:func:`with_method_options` adds to a command:

- the shared settings, in one group: ``--grid``, ``--window``, ``--stride``,
  ``--baseline``, ``--batch-size``, ``--score`` (validated here, once);
- one option per setting that a registered method declares (its ``Method.settings``
  dataclass: ``--masks``, ``--incremental``, ``--ig-steps``...), built from the registry
  whenever the command runs, so a method registered by a plug-in brings its own options;
- ``--metrics``;

and hands the command one :class:`MethodOptions`, whose :meth:`~MethodOptions.settings` is
the :class:`~blackbox_vqa.explainers.registry.MethodSettings` of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from blackbox_vqa.cli.option_groups import Parameter, option_group
from blackbox_vqa.errors import InputError

__all__ = ["MethodOptions", "method_help", "with_method_choice", "with_method_options"]

_PANEL = "Method options"


@dataclass(frozen=True)
class MethodOptions:
    """The method options' values, checked: the shared settings parsed, and each method
    setting by its keyword."""

    grid: int = 16
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    baseline: str = "imagenet-mean"
    batch_size: str = "auto"
    score: str = "probability"
    own: Mapping[str, Any] = field(default_factory=dict)
    metrics: bool = False

    def settings(self) -> Any:
        """The ``MethodSettings`` of these options; invalid method settings raise
        :class:`~blackbox_vqa.errors.InputError` naming them."""
        from blackbox_vqa.explainers.registry import MethodSettings

        return MethodSettings.create(grid=self.grid, window=self.window, stride=self.stride,
                                     baseline=self.baseline, batch_size=self.batch_size,
                                     score=self.score, **self.own)

    def recorded(self, methods: Sequence[str]) -> dict[str, Any]:
        """The own settings of ``methods`` as a run records them, by option name
        (``masks``, ``ig_steps``...); those of methods that do not run are left out, so a
        run continues whatever their options say."""
        from blackbox_vqa.explainers.registry import all_setting_specs

        settings = self.settings()
        return {spec.flag.replace("-", "_"): getattr(settings.of(spec.method), spec.name)
                for spec in all_setting_specs() if spec.method in methods}


def method_help(what: str) -> str:
    """Help of a ``--method``/``--methods`` option listing the registered methods."""
    from blackbox_vqa.explainers.registry import get_method, method_names

    names = ", ".join(f"{name} ({get_method(name).kind})" for name in method_names())
    return f"{what}, comma-separated: {names}, or all."


_SHARED: list[Parameter] = [
    ("grid", Annotated[int, typer.Option(
        help="Occlusion grid cells per side.", rich_help_panel=_PANEL)], 16),
    ("window", Annotated[str | None, typer.Option(
        help="Sliding window N or HxW pixels (instead of the grid).",
        rich_help_panel=_PANEL)], None),
    ("stride", Annotated[str | None, typer.Option(
        help="Window step N or HxW pixels (default: the window).", rich_help_panel=_PANEL)],
     None),
    ("baseline", Annotated[str, typer.Option(
        help="Patch fill: imagenet-mean, black, blur or R,G,B (0-255).",
        rich_help_panel=_PANEL)], "imagenet-mean"),
    ("batch_size", Annotated[str, typer.Option(
        help="Perturbed inputs per model call: auto or N.", rich_help_panel=_PANEL)], "auto"),
    ("score", Annotated[str, typer.Option(
        help="What occlusion and RISE compare: probability (the paper's) or "
        "log-probability.", rich_help_panel=_PANEL)], "probability"),
]
_METRICS: Parameter = (
    "metrics", Annotated[bool, typer.Option(
        "--metrics", help="Also measure each map's faithfulness: deletion/insertion AUC "
        "of image maps, comprehensiveness/sufficiency of word maps, beside random orders.",
        rich_help_panel=_PANEL)], False)


def _parameters() -> list[Parameter]:
    """The shared options, one per registered method setting, and ``--metrics``."""
    from blackbox_vqa.explainers.registry import all_setting_specs

    own: list[Parameter] = []
    for spec in all_setting_specs():
        option = (typer.Option(f"--{spec.flag}", help=spec.help, rich_help_panel=_PANEL)
                  if spec.type is not bool else
                  typer.Option(f"--{spec.flag}/--no-{spec.flag}", help=spec.help,
                               rich_help_panel=_PANEL))
        own.append((spec.name, Annotated[spec.type, option], spec.default))
    return [*_SHARED, *own, _METRICS]


def _build(values: dict[str, Any]) -> MethodOptions:
    from blackbox_vqa.explainers.batching import parse_batch_size
    from blackbox_vqa.explainers.masks import parse_baseline
    from blackbox_vqa.sizes import parse_size

    grid = values.pop("grid")
    if grid < 1:
        raise InputError(f"--grid must be >= 1, got {grid}")
    window = parse_size(values.pop("window"), "--window")
    stride = parse_size(values.pop("stride"), "--stride")
    if stride is not None and window is None:
        raise InputError("--stride needs --window")
    baseline = values.pop("baseline")
    parse_baseline(baseline)
    batch_size = values.pop("batch_size")
    parse_batch_size(batch_size)
    return MethodOptions(grid=grid, window=window, stride=stride, baseline=baseline,
                         batch_size=batch_size, score=values.pop("score"),
                         metrics=values.pop("metrics"), own=values)


def with_method_options(command: Callable[..., None]) -> Callable[..., None]:
    """Decorate a Typer command that has a ``method_options: MethodOptions`` parameter."""
    return option_group(_parameters, "method_options", _build)(command)


def with_method_choice(
    name: str, default: str | None, what: str
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a command whose ``name`` parameter (``method``, ``methods``) selects methods:
    its option's help lists the methods registered when the command runs. Both spellings,
    ``--method`` and ``--methods``, are accepted by every command (``explain`` says one,
    ``compare`` and ``evaluate`` the other)."""
    other = "methods" if name == "method" else "method"

    def parameters() -> list[Parameter]:
        kind = str if default is not None else str | None
        option = typer.Option(f"--{name}", f"--{other}", help=method_help(what))
        return [(name, Annotated[kind, option], default)]

    return option_group(parameters, name, lambda values: values[name])
