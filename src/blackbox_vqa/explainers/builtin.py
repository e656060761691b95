"""Registry entries of the built-in methods: occlusion, guided backpropagation, gradients,
integrated gradients, RISE and MM-SHAP.

Each entry binds lazily: nothing here imports torch until a gradient method is bound.
"""

from __future__ import annotations

import time
from typing import Any

from blackbox_vqa.errors import GradientUnavailableError, NotSupportedError
from blackbox_vqa.explainers.registry import Method, MethodRequest, ModelContext, register
from blackbox_vqa.explanation import Attribution

__all__ = ["GRADIENT", "GUIDED_BACKPROP", "INTEGRATED_GRADIENTS", "MM_SHAP", "OCCLUSION", "RISE"]


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
                           incremental=s.incremental, score=s.score,  # type: ignore[arg-type]
                           progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.occlusion import occlusion_attribution

        started = time.perf_counter()
        result = self._explainer(request.progress).explain(
            request.image, request.question, answer=request.answer)
        return occlusion_attribution(result, seconds=time.perf_counter() - started)


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

        started = time.perf_counter()
        result = self._explainer.explain(request.image, request.question,
                                         answer=request.answer)
        return gradient_attribution(result, method=self.name, key=self.key,
                                    source=self.source, seconds=time.perf_counter() - started)


class _IntegratedGradientsMethod:
    """Integrated gradients bound to one model's gradient source (path gradients)."""

    def __init__(self, context: ModelContext) -> None:
        from blackbox_vqa.explainers.integrated_gradients import IntegratedGradients
        from blackbox_vqa.gradient_source import find_gradient_source

        model, self.source, reason = find_gradient_source(context.label, context.model,
                                                          "integrated gradients")
        if model is None:
            raise NotSupportedError(reason)
        settings = context.settings
        try:
            self._explainer = IntegratedGradients(model, steps=settings.ig_steps,
                                                  baseline=settings.ig_baseline)
        except GradientUnavailableError as exc:
            raise NotSupportedError(str(exc)) from exc

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.integrated_gradients import ig_attribution

        started = time.perf_counter()
        result = self._explainer.explain(request.image, request.question,
                                         answer=request.answer)
        return ig_attribution(result, source=self.source,
                              seconds=time.perf_counter() - started)


class _RiseMethod:
    """RISE bound to one model (see :mod:`blackbox_vqa.explainers.rise`)."""

    def __init__(self, context: ModelContext) -> None:
        self.model = context.model
        self.settings = context.settings
        self._rise(None)  # validates the settings now

    def _rise(self, progress: Any) -> Any:
        from blackbox_vqa.explainers.rise import Rise

        s = self.settings
        return Rise(self.model, masks=s.rise_masks, baseline=s.baseline,
                    batch_size=s.batch_size, score=s.score,  # type: ignore[arg-type]
                    progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.rise import rise_attribution

        started = time.perf_counter()
        result = self._rise(request.progress).explain(request.image, request.question,
                                                      answer=request.answer)
        return rise_attribution(result, seconds=time.perf_counter() - started)


class _ModalityShareMethod:
    """MM-SHAP bound to one model (see :mod:`blackbox_vqa.explainers.modality_share`)."""

    def __init__(self, context: ModelContext) -> None:
        self.model = context.model
        self.settings = context.settings
        self._explainer(None)  # validates the settings now

    def _explainer(self, progress: Any) -> Any:
        from blackbox_vqa.explainers.modality_share import ModalityShare

        s = self.settings
        return ModalityShare(self.model, grid=s.shap_grid, permutations=s.shap_permutations,
                             seed=s.shap_seed, baseline=s.baseline, batch_size=s.batch_size,
                             score=s.score, progress=progress)

    def explain(self, request: MethodRequest) -> Attribution:
        from blackbox_vqa.explainers.modality_share import modality_share_attribution

        started = time.perf_counter()
        result = self._explainer(request.progress).explain(
            request.image, request.question, answer=request.answer)
        return modality_share_attribution(result, seconds=time.perf_counter() - started)


OCCLUSION = Method(
    name="occlusion",
    key="occlusion",
    signed=True,
    help="p(a | image) - p(a | cell hidden): red cells support the answer, blue cells work "
    "against it",
    bind=_OcclusionMethod,
    image_label="p(a | original) - p(a | occluded)",
    kind="black-box",
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
)

for _method in (OCCLUSION, GUIDED_BACKPROP, GRADIENT, INTEGRATED_GRADIENTS, RISE, MM_SHAP):
    register(_method, replace=True)
