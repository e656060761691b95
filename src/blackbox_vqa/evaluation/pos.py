"""Question words by part of speech (Goyal et al. 2016, Figure 3).

Each question's words (as the explainers split them) are tagged with Penn-Treebank tags,
WDT/WP/WP$/WRB grouped as ``wh-words``. For each tag among the most frequent:
``P(word is the most important of its question | tag)``, where the most important word is
the one with the largest importance in a method's word map. When ``k`` words tie for the
largest value each gets ``1/k``; a question whose words all tie (say, a model that ignores
the question) says nothing and is left out and counted. ``chance`` is the same probability
for a word picked uniformly at random from its question (the mean of ``1/len(question)``).

Tagger: nltk's averaged perceptron when its data is installed, otherwise TextBlob's
bundled Pattern tagger (no download needed); :attr:`Tagger.name` records which.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray

from blackbox_vqa.errors import InputError, NotSupportedError

__all__ = [
    "NLTK_RESOURCE",
    "TAGGERS",
    "TOP_TAGS",
    "WH_GROUP",
    "PosResult",
    "Tagger",
    "group_tag",
    "importance_by_tag",
    "load_tagger",
    "most_important_credit",
    "nltk_tagger_available",
    "pos_figure",
    "top_tags",
]

TOP_TAGS = 15
WH_GROUP = "wh-words"
WH_TAGS = frozenset({"WDT", "WP", "WP$", "WRB"})
TAGGERS = ("auto", "nltk", "pattern")
NLTK_RESOURCE = "taggers/averaged_perceptron_tagger_eng"
# Word-map values within this of the largest count as tied for "most important".
_TIE_TOLERANCE = 1e-12


class Tagger(Protocol):
    """Gives one Penn-Treebank tag per word; ``name`` says which tagger it is."""

    name: str

    def tag(self, words: Sequence[str]) -> list[str]: ...


class PatternTagger:
    """TextBlob's bundled Pattern tagger (works offline, no data download)."""

    name = "textblob-pattern"

    def __init__(self) -> None:
        from textblob.en.taggers import PatternTagger as _Pattern

        self._tagger = _Pattern()

    def tag(self, words: Sequence[str]) -> list[str]:
        """Tags of ``words`` (no word may contain white space)."""
        if not words:
            return []
        pairs = self._tagger.tag(" ".join(words), tokenize=False)
        if len(pairs) != len(words):
            pairs = [self._tagger.tag(word, tokenize=False)[0] for word in words]
        return [str(tag) for _, tag in pairs]


class NltkTagger:
    """nltk's averaged perceptron tagger (needs its data installed)."""

    name = "nltk-averaged-perceptron"

    def tag(self, words: Sequence[str]) -> list[str]:
        """Tags of ``words``."""
        import nltk

        return [str(tag) for _, tag in nltk.pos_tag(list(words))]


def nltk_tagger_available(paths: Sequence[str] | None = None) -> bool:
    """Whether nltk and its averaged-perceptron data are installed (searched in ``paths``)."""
    try:
        import nltk
    except ImportError:
        return False
    try:
        nltk.data.find(NLTK_RESOURCE, paths=list(paths) if paths is not None else None)
    except LookupError:
        return False
    return True


def load_tagger(prefer: str = "auto", *, nltk_paths: Sequence[str] | None = None) -> Tagger:
    """``"auto"``: nltk if its data is installed, else Pattern; ``"nltk"`` or ``"pattern"``."""
    if prefer not in TAGGERS:
        raise InputError(f"tagger must be one of {', '.join(TAGGERS)}, got {prefer!r}")
    if prefer == "pattern":
        return PatternTagger()
    if nltk_tagger_available(nltk_paths):
        return NltkTagger()
    if prefer == "nltk":
        raise NotSupportedError(
            f"the nltk tagger needs its data ({NLTK_RESOURCE}), which is not installed; "
            "use the offline tagger (pattern) or install the data with nltk.download"
        )
    return PatternTagger()


def group_tag(tag: str) -> str:
    """The tag's group: WDT, WP, WP$ and WRB are ``wh-words``; other tags are themselves."""
    return WH_GROUP if tag in WH_TAGS else tag


def most_important_credit(word_map: NDArray[Any]) -> NDArray[np.float64] | None:
    """Credit per word: ``1/k`` for each of the ``k`` words tied for the largest value.

    None when every word ties (the map names no most important word) or there are none.
    """
    values = np.asarray(word_map, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    top = values >= values.max() - _TIE_TOLERANCE
    if values.size > 1 and top.all():
        return None
    return top / float(top.sum())


def top_tags(tagged: Sequence[Sequence[str]], top: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The ``top`` most frequent grouped tags over all questions, most frequent first
    (equal counts ordered by name)."""
    counts = Counter(group_tag(t) for tags in tagged for t in tags)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


@dataclass(frozen=True)
class PosResult:
    """``probability[tag]`` (None where no word has the tag), ``count[tag]`` words seen,
    ``chance[tag]``, and how many questions were used or left out as uninformative."""

    probability: Mapping[str, float | None]
    count: Mapping[str, int]
    chance: Mapping[str, float | None]
    questions: int
    uninformative: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"probability": dict(self.probability), "count": dict(self.count),
                "chance": dict(self.chance), "questions": self.questions,
                "uninformative": self.uninformative}


def importance_by_tag(
    tagged: Sequence[Sequence[str]],
    word_maps: Sequence[NDArray[Any] | None],
    tags: Sequence[str],
) -> PosResult:
    """``P(most important | tag)`` for each of ``tags`` (grouped), from one method's maps.

    ``tagged[i]`` holds the (raw) tags of question ``i``'s words and ``word_maps[i]`` one
    importance per word (None: no map for that question).
    """
    if len(tagged) != len(word_maps):
        raise InputError(f"{len(tagged)} tagged questions but {len(word_maps)} word maps")
    credit: dict[str, float] = {}
    count: Counter[str] = Counter()
    chance: dict[str, float] = {}
    used = uninformative = 0
    for tags_of_question, word_map in zip(tagged, word_maps, strict=True):
        if word_map is None or len(word_map) != len(tags_of_question):
            continue
        shares = most_important_credit(word_map)
        if shares is None:
            uninformative += 1
            continue
        used += 1
        for tag, share in zip(tags_of_question, shares, strict=True):
            group = group_tag(tag)
            credit[group] = credit.get(group, 0.0) + float(share)
            count[group] += 1
            chance[group] = chance.get(group, 0.0) + 1.0 / len(tags_of_question)
    return PosResult(
        probability={t: credit[t] / count[t] if count[t] else None for t in tags},
        count={t: count[t] for t in tags},
        chance={t: chance[t] / count[t] if count[t] else None for t in tags},
        questions=used,
        uninformative=uninformative,
    )


def pos_figure(
    tags: Sequence[str],
    probability: Mapping[str, Mapping[str, float | None]],
    chance: Mapping[str, float | None],
    *,
    title: str,
) -> Figure:
    """Grouped bars: one group per tag (most frequent first), one bar per method
    (``probability[method][tag]``), the chance level as a dotted tick."""
    fig = Figure(figsize=(max(6.4, 0.75 * len(tags) + 2.0), 4.2), dpi=100,
                 layout="constrained")
    axis = fig.subplots()
    positions = np.arange(len(tags), dtype=np.float64)
    width = 0.8 / max(1, len(probability))
    for k, (method, values) in enumerate(probability.items()):
        heights = [values.get(t) or 0.0 for t in tags]
        axis.bar(positions - 0.4 + width * (k + 0.5), heights, width=width, label=method)
    for x, tag in zip(positions, tags, strict=True):
        level = chance.get(tag)
        if level is not None:
            axis.hlines(level, x - 0.42, x + 0.42, colors="black", linestyles="dotted",
                        linewidth=1.0)
    axis.plot([], [], color="black", linestyle="dotted", label="chance")
    axis.set_xticks(positions, labels=list(tags), rotation=45, ha="right")
    axis.set_ylabel("P(most important word | tag)")
    axis.set_ylim(0.0, 1.0)
    axis.set_title(title)
    axis.legend(fontsize=8)
    return fig
