"""Write one benchmark's markdown section into docs/benchmarks.md, replacing its old one.

Each benchmark owns the text between ``<!-- name:start -->`` and ``<!-- name:end -->``,
so several scripts can update the same page without clobbering each other.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of ``doc`` with ``markdown``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = (
        doc.read_text()
        if doc.exists()
        else "# Benchmarks\n\nMeasured numbers; each section is rewritten by the script it names.\n"
    )
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
