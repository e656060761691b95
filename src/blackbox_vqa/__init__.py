"""blackbox_vqa: explain any Visual Question Answering model.

Every model sits behind one protocol (``answers``, ``answer_probs``,
``answer_probs_batch``); explainers and evaluators talk to that protocol only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blackbox_vqa.adapters.base import BaseAdapter, VQAModel, check_model
from blackbox_vqa.errors import (
    BlackboxVQAError,
    GradientUnavailableError,
    ImageError,
    InputError,
    ModelError,
    ModelLoadError,
    ModelOutputError,
    NotSupportedError,
    QuestionError,
)
from blackbox_vqa.explainers.occlusion import Occlusion, OcclusionResult
from blackbox_vqa.explanation import Explanation, set_html_renderer
from blackbox_vqa.text import WordTokenizer

if TYPE_CHECKING:
    from blackbox_vqa.adapters.torch.module import TorchAdapter

from blackbox_vqa.version import __version__


def _explanation_html(explanation: Explanation) -> str:
    # The report (matplotlib, Jinja2) loads on the first display, not on import.
    from blackbox_vqa.report.notebook import explanation_html

    return explanation_html(explanation)


set_html_renderer(_explanation_html)


def __getattr__(name: str) -> Any:
    # TorchAdapter imports torch (seconds); load it only when asked for.
    if name == "TorchAdapter":
        from blackbox_vqa.adapters.torch.module import TorchAdapter

        return TorchAdapter
    raise AttributeError(f"module 'blackbox_vqa' has no attribute {name!r}")

__all__ = [
    "BaseAdapter",
    "BlackboxVQAError",
    "GradientUnavailableError",
    "ImageError",
    "InputError",
    "ModelError",
    "ModelLoadError",
    "ModelOutputError",
    "NotSupportedError",
    "Occlusion",
    "OcclusionResult",
    "QuestionError",
    "TorchAdapter",
    "VQAModel",
    "WordTokenizer",
    "__version__",
    "check_model",
]
