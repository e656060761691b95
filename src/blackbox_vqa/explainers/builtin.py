"""Registry entries of the built-in methods: occlusion, guided backpropagation, gradients,
integrated gradients, RISE and MM-SHAP, each with the settings it declares.

Each entry binds lazily: nothing here imports torch until a gradient method is bound. A
bound method returns its :class:`Attribution`; the library call times it and checks its key
and sign against the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blackbox_vqa.errors import GradientUnavailableError, InputError, NotSupportedError
from blackbox_vqa.explainers.cost import CallEstimate, CostQuery
from blackbox_vqa.explainers.registry import (
    Method,
    MethodRequest,
    ModelContext,
    positive_int,
    register,
    setting,
)
from blackbox_vqa.explanation import Attribution

__all__ = [
    "GRADIENT",
    "GUIDED_BACKPROP",
    "INTEGRATED_GRADIENTS",
    "MM_SHAP",
    "OCCLUSION",
    "RISE",
    "TOKEN_OCCLUSION",
    "IntegratedGradientsSettings",
    "ModalityShareSettings",
    "OcclusionSettings",
    "RiseSettings",
]


@dataclass(frozen=True)
class OcclusionSettings:
    """Occlusion's own setting (grid, window, baseline... are shared)."""

    incremental: str = setting(
        "exact", help="Occlusion on a PyTorch model: exact (compute only what each patch "
        "changes; same maps), off, or approx[:TAU] (cap each change at TAU, default 0.6, of "
        "every feature map's side: faster, approximate, error measured on 16 cells).")

    def __post_init__(self) -> None:
        from blackbox_vqa.adapters.incremental import parse_incremental

        object.__setattr__(self, "incremental", parse_incremental(self.incremental))


@dataclass(frozen=True)
class RiseSettings:
    """RISE's own setting."""

    rise_masks: int = setting(2000, flag="masks", help="RISE: random masks.")

    def __post_init__(self) -> None:
        positive_int("rise_masks", self.rise_masks)


@dataclass(frozen=True)
class IntegratedGradientsSettings:
    """Integrated gradients' own settings."""

    ig_steps: int = setting(32, help="Integrated gradients: points of the path integral.")
    ig_baseline: str = setting(
        "black", help="Integrated gradients: image baseline, black, blur or imagenet-mean.")

    def __post_init__(self) -> None:
        positive_int("ig_steps", self.ig_steps)


@dataclass(frozen=True)
class ModalityShareSettings:
    """MM-SHAP's own settings (the cells' fill, batch size and score are shared)."""

    shap_grid: int = setting(4, help="MM-SHAP: image cells per side (the image players).")
    shap_permutations: int = setting(
        32, help="MM-SHAP: permutations sampled (even: antithetic pairs); about one model "
        "input per player per permutation.")
    shap_seed: int = setting(0, help="MM-SHAP: seed of the permutations.")

    def __post_init__(self) -> None:
        positive_int("shap_grid", self.shap_grid)
        positive_int("shap_permutations", self.shap_permutations)
        if self.shap_permutations % 2:
            raise InputError("shap_permutations must be even (antithetic pairs of a "
                             f"permutation and its reverse), got {self.shap_permutations}")
        if isinstance(self.shap_seed, bool) or not isinstance(self.shap_seed, int) \
                or self.shap_seed < 0:
            raise InputError(f"shap_seed must be a non-negative integer, got {self.shap_seed!r}")


class _OcclusionMethod:
    """Occlusion bound to one model (see :mod:`blackbox_vqa.explainers.occlusion`)."""

    def __init__(self, context: ModelContext) -> None:
        from blackbox_vqa.explainers.occlusion import Occlusion

        self.model = context.model
        self.settings = context.settings
        self._build = Occlusion
        self._explainer(None)  # validates the settings now, before any input

    def _explainer(self, progress: Any) -> Any:
        s = self.settings
        return self._build(self.model, grid=s.grid, window=s.window, stride=s.stride,
                           baseline=s.baseline, batch_size=s.batch_size,
                           incremental=s.of("occlusion").incremental,
                           score=s.score,  # type: ignore[arg-type]
                           progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.occlusion import occlusion_attribution

        result = self._explainer(request.progress).explain(
            request.image, request.question, answer=request.answer)
        return occlusion_attribution(result)


def _gradient_available(context: ModelContext) -> str | None:
    from blackbox_vqa.gradient_source import gradient_source_reason

    return gradient_source_reason(context.label, context.model)


def _path_gradients_available(context: ModelContext) -> str | None:
    from blackbox_vqa.gradient_source import gradient_source_reason

    return gradient_source_reason(context.label, context.model, "integrated gradients")


class _GradientMethod:
    """Guided (or plain) gradients bound to one model's gradient source."""

    def __init__(self, context: ModelContext, *, guided: bool, name: str, key: str) -> None:
        from blackbox_vqa.explainers.guided_backprop import GuidedBackprop
        from blackbox_vqa.gradient_source import find_gradient_source

        model, self.source, reason = find_gradient_source(context.label, context.model)
        if model is None:
            raise NotSupportedError(reason)
        try:
            self._explainer = GuidedBackprop(model, guided=guided)
        except GradientUnavailableError as exc:
            raise NotSupportedError(str(exc)) from exc
        self.name, self.key = name, key

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.guided_backprop import gradient_attribution

        result = self._explainer.explain(request.image, request.question,
                                         answer=request.answer)
        return gradient_attribution(result, method=self.name, key=self.key,
                                    source=self.source)


class _IntegratedGradientsMethod:
    """Integrated gradients bound to one model's gradient source (path gradients)."""

    def __init__(self, context: ModelContext) -> None:
        from blackbox_vqa.explainers.integrated_gradients import IntegratedGradients
        from blackbox_vqa.gradient_source import find_gradient_source

        model, self.source, reason = find_gradient_source(context.label, context.model,
                                                          "integrated gradients")
        if model is None:
            raise NotSupportedError(reason)
        own = context.settings.of("integrated-gradients")
        try:
            self._explainer = IntegratedGradients(model, steps=own.ig_steps,
                                                  baseline=own.ig_baseline)
        except GradientUnavailableError as exc:
            raise NotSupportedError(str(exc)) from exc

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.integrated_gradients import ig_attribution

        result = self._explainer.explain(request.image, request.question,
                                         answer=request.answer)
        return ig_attribution(result, source=self.source)


class _RiseMethod:
    """RISE bound to one model (see :mod:`blackbox_vqa.explainers.rise`)."""

    def __init__(self, context: ModelContext) -> None:
        self.model = context.model
        self.settings = context.settings
        self._rise(None)  # validates the settings now

    def _rise(self, progress: Any) -> Any:
        from blackbox_vqa.explainers.rise import Rise

        s = self.settings
        return Rise(self.model, masks=s.of("rise").rise_masks, baseline=s.baseline,
                    batch_size=s.batch_size, score=s.score,  # type: ignore[arg-type]
                    progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.rise import rise_attribution

        result = self._rise(request.progress).explain(request.image, request.question,
                                                      answer=request.answer)
        return rise_attribution(result)


class _ModalityShareMethod:
    """MM-SHAP bound to one model (see :mod:`blackbox_vqa.explainers.modality_share`)."""

    def __init__(self, context: ModelContext) -> None:
        self.model = context.model
        self.settings = context.settings
        self._explainer(None)  # validates the settings now

    def _explainer(self, progress: Any) -> Any:
        from blackbox_vqa.explainers.modality_share import ModalityShare

        s, own = self.settings, self.settings.of("mm-shap")
        return ModalityShare(self.model, grid=own.shap_grid,
                             permutations=own.shap_permutations, seed=own.shap_seed,
                             baseline=s.baseline, batch_size=s.batch_size, score=s.score,
                             progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.modality_share import modality_share_attribution

        result = self._explainer(request.progress).explain(
            request.image, request.question, answer=request.answer)
        return modality_share_attribution(result)


def _occlusion_calls(query: CostQuery) -> CallEstimate:
    """One input per patch and per word (the original is the run's)."""
    from blackbox_vqa.explainers.masks import occlusion_evaluations

    shared = query.settings
    count = occlusion_evaluations(query.height, query.width, query.words, grid=shared.grid,
                                  window=shared.window, stride=shared.stride)
    if shared.window is None:
        return CallEstimate(count - 1, image_units=shared.grid ** 2, word_map=True)
    return CallEstimate(count - 1, image_units=query.height * query.width, pixel_map=True,
                        word_map=True)


def _rise_calls(query: CostQuery) -> CallEstimate:
    """One input per mask; a map per pixel, no word map."""
    masks = query.settings.of("rise").rise_masks
    return CallEstimate(masks, image_units=query.height * query.width, pixel_map=True)


def _modality_share_calls(query: CostQuery) -> CallEstimate:
    """Each distinct coalition once, at most (the whole input is the original)."""
    from blackbox_vqa.explainers.modality_share import ModalityShare
    from blackbox_vqa.explainers.shapley import modality_share_evaluations

    own = query.settings.of("mm-shap")
    players = ModalityShare.players_of((query.height, query.width), "w " * query.words,
                                       own.shap_grid)
    count = modality_share_evaluations(players, own.shap_permutations, "antithetic")
    return CallEstimate(count - 1, exact=False, image_units=own.shap_grid ** 2,
                        word_map=True)


OCCLUSION = Method(
    name="occlusion",
    key="occlusion",
    signed=True,
    help="p(a | image) - p(a | cell hidden): red cells support the answer, blue cells work "
    "against it",
    bind=_OcclusionMethod,
    image_label="p(a | original) - p(a | occluded)",
    kind="black-box",
    settings=OcclusionSettings,
    calls=_occlusion_calls,
)

GUIDED_BACKPROP = Method(
    name="guided-bp",
    key="guided_backprop",
    signed=False,
    help="|guided gradient| at the model's input size, largest over the colour channels",
    bind=lambda context: _GradientMethod(context, guided=True, name="guided-bp",
                                         key="guided_backprop"),
    available=_gradient_available,
    image_label="max over channels of |gradient|",
    kind="white-box",
)

GRADIENT = Method(
    name="gradient",
    key="gradient",
    signed=False,
    help="|gradient| at the model's input size, largest over the colour channels",
    bind=lambda context: _GradientMethod(context, guided=False, name="gradient",
                                         key="gradient"),
    available=_gradient_available,
    image_label="max over channels of |gradient|",
    kind="white-box",
)

INTEGRATED_GRADIENTS = Method(
    name="integrated-gradients",
    key="integrated_gradients",
    signed=True,
    help="integrated gradients (Sundararajan et al. 2017) from a black, blurred or mean "
    "image and padding-token words: signed, channels summed, at the model's input size",
    bind=_IntegratedGradientsMethod,
    available=_path_gradients_available,
    image_label="integrated gradients (sum over channels)",
    kind="white-box",
    default=False,
    settings=IntegratedGradientsSettings,
)

RISE = Method(
    name="rise",
    key="rise",
    signed=False,
    help="RISE (Petsiuk et al. 2018): mean score under random masks, weighted by each "
    "pixel's visibility; higher supports the answer",
    bind=_RiseMethod,
    image_label="mask-weighted mean score",
    kind="black-box",
    default=False,
    settings=RiseSettings,
    calls=_rise_calls,
)

MM_SHAP = Method(
    name="mm-shap",
    key="mm_shap",
    signed=True,
    help="MM-SHAP (Parcalabescu & Frank 2023): Shapley values of image cells and question "
    "words by sampled permutations; T-SHAP / V-SHAP: the question's / image's share",
    bind=_ModalityShareMethod,
    image_label="Shapley value of the cell",
    kind="black-box",
    default=False,
    settings=ModalityShareSettings,
    calls=_modality_share_calls,
)



class _TokenOcclusionMethod:
    """Token occlusion bound to one model (see
    :mod:`blackbox_vqa.explainers.token_occlusion`)."""

    def __init__(self, context: ModelContext) -> None:
        from blackbox_vqa.explainers.token_occlusion import TokenOcclusion

        s = context.settings
        self._explainer = TokenOcclusion(context.model, grid=s.grid,
                                         score=s.score)  # type: ignore[arg-type]

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.token_occlusion import token_occlusion_attribution

        result = self._explainer.explain(request.image, request.question,
                                         answer=request.answer)
        return token_occlusion_attribution(result)


TOKEN_OCCLUSION = Method(
    name="token-occlusion",
    key="token_occlusion",
    signed=True,
    help="p(a | image) - p(a | the cell's patch tokens ablated after the vision embedding, "
    "ViLT and hf: chat VLMs): a different question from pixel occlusion",
    bind=_TokenOcclusionMethod,
    image_label="p(a | original) - p(a | tokens ablated)",
    kind="black-box",
    default=False,
)

for _method in (OCCLUSION, GUIDED_BACKPROP, GRADIENT, INTEGRATED_GRADIENTS, RISE, MM_SHAP,
                TOKEN_OCCLUSION):
    register(_method, replace=True)
