"""A generated movie-review sentiment sample, so the whole pipeline runs offline with no downloads.

``builtin:sentiment`` yields short reviews built from templates, sentiment words and negations
("the plot was not dull" is positive), with 5% of labels flipped so no model reaches 100%. It is
deterministic: the same split always holds the same sentences. No SST-2 text is used.
"""

from __future__ import annotations

import random

import pandas as pd

from kdlib.errors import KDError

SCHEME = "builtin:"
SIZES = {"train": 3000, "validation": 500, "dev": 500, "test": 500}
SEEDS = {"train": 1, "validation": 2, "dev": 2, "test": 3}

POSITIVE = ["good", "great", "gorgeous", "witty", "moving", "brilliant", "charming", "funny", "touching", "superb", "fresh", "smart"]
NEGATIVE = ["bad", "dull", "tedious", "boring", "clumsy", "awful", "bland", "messy", "lifeless", "stale", "silly", "weak"]
SUBJECTS = ["the film", "the movie", "the plot", "the script", "the cast", "the ending", "the story", "the dialogue", "this picture", "the acting"]
VERBS = ["is", "was", "feels", "seems", "remains"]
ADVERBS = ["", "", "really ", "truly ", "quite ", "rather ", "often "]
FILLERS = ["", "", "", " overall", " at times", " from start to finish", " for the most part"]
CONNECTORS = [", and", ", but", "; still,"]


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.25
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {'not ' if negated else ''}{rng.choice(ADVERBS)}{word}{rng.choice(FILLERS)}"
    return text, int(positive != negated)


def _review(rng: random.Random) -> tuple[str, int]:
    text, label = _clause(rng)
    if rng.random() < 0.3:
        # After "but" the second clause decides, as reviewers write it.
        connector = rng.choice(CONNECTORS)
        second, second_label = _clause(rng)
        text = f"{text}{connector} {second}"
        label = second_label if connector != ", and" else label
    return text, label


def load(source: str, split: str) -> pd.DataFrame:
    name = source[len(SCHEME) :]
    if name != "sentiment":
        raise KDError(f"data: unknown built-in source {source!r}; expected {SCHEME}sentiment")
    if split not in SIZES:
        raise KDError(f"data: {source} has no split {split!r}; it has {sorted(SIZES)}")
    rng = random.Random(SEEDS[split])
    rows = []
    for _ in range(SIZES[split]):
        text, label = _review(rng)
        if rng.random() < 0.05:
            label = 1 - label
        rows.append((text, label))
    return pd.DataFrame(rows, columns=["sentence", "label"])
