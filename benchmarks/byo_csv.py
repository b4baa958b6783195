"""A bring-your-own CSV nobody tuned on (issue 17 point 2): WordNet noun glosses -> supersense.

    apt-get install wordnet-base            # Debian's WordNet 3.0 (permissive licence)
    python benchmarks/byo_csv.py /tmp/wordnet10.csv
    python benchmarks/frontier.py --rows dense_fp32,<row> --seeds 0 --rounds 5 \\
        --set dataset=file --set data-path=/tmp/wordnet10.csv --set text-column=text \\
        --set label-column=label --set partitioning=dirichlet --set num-partitions=10 \\
        --set dirichlet-alpha=0.5 --json benchmarks/results/frontier_byo.json --no-doc

Each noun synset of ``/usr/share/wordnet/data.noun`` is one row: its gloss (the definition,
without the usage examples) and its lexicographer file, the noun's supersense
(``lexnames(5WN)``). The ten largest supersenses are kept, ``per_class`` rows each (the first
synsets of the file: deterministic), so the majority class is 0.1. Nothing here is fedtune's:
it is the kind of file a user brings.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

DATA = Path("/usr/share/wordnet/data.noun")
#: lexicographer file number -> supersense (WordNet's lexnames), the ten largest noun files
LEX = {6: "artifact", 18: "person", 20: "plant", 5: "animal", 4: "act",
       10: "communication", 26: "state", 15: "location", 7: "attribute", 27: "substance"}  # fmt: skip


def rows(per_class: int = 1200) -> list[tuple[str, str]]:
    if not DATA.exists():
        raise SystemExit(f"{DATA} is missing: apt-get install wordnet-base")
    by: dict[str, list[str]] = defaultdict(list)
    for line in DATA.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:  # the licence header
            continue
        label = LEX.get(int(line.split()[1]))
        if label is None or len(by[label]) >= per_class:
            continue
        gloss = line.split("|", 1)[1].split(';')[0].split('"')[0].strip()
        if gloss:
            by[label].append(gloss)
    return [(t, label) for label in LEX.values() for t in by[label]]


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "/tmp/wordnet10.csv")
    data = rows()
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(data)
    print(f"wrote {len(data)} rows, {len(LEX)} labels to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
