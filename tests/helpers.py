"""Small builders shared by tests (no network, tiny sizes)."""

from __future__ import annotations

import csv
from pathlib import Path

_WORDS = {
    "positive": ["great", "love", "wonderful", "happy", "excellent", "thanks"],
    "negative": ["awful", "hate", "terrible", "delayed", "worst", "angry"],
    "neutral": ["flight", "today", "gate", "ticket", "phone", "car"],
}


def write_sentiment_csv(path: Path, n: int = 120, with_client: bool = False) -> Path:
    """A deterministic 3-class CSV whose label is readable from its words."""
    labels = sorted(_WORDS)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "sentiment", "site"])
        for i in range(n):
            lab = labels[i % 3]
            words = _WORDS[lab]
            text = f"{words[i % 6]} {words[(i * 7) % 6]} item {i}"
            w.writerow([text, lab, f"site{i % 4}"])
    return path
