"""Where benchmark results go: ``benchmarks/results/NAME.json`` and the ``NAME`` section of
docs/performance.md (between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``), both written to a
temporary name and renamed, so an interrupted benchmark leaves the old files whole."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def commit() -> str:
    """The measured commit: ``git rev-parse --short HEAD``, with ``+changes`` when the working tree
    differs from it (``unknown`` outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def load_average() -> list:
    """The machine's load average over 1, 5 and 15 minutes (``uptime``'s), to quote beside timings taken
    on a shared machine."""
    return [round(v, 2) for v in os.getloadavg()]


def load_sentence(start: list, end: list, cores) -> str:
    return (f"Load average (1, 5, 15 min) on the {cores}-core machine: {', '.join(map(str, start))} at the start, "
            f"{', '.join(map(str, end))} at the end.")


def write_results(name: str, result: dict, markdown: str) -> None:
    """Save ``result`` as JSON and put ``markdown`` in its own section of docs/performance.md."""
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace(out, json.dumps(result, indent=2) + "\n")
    write_section(name, markdown)


def write_section(name: str, markdown: str, doc_path: Path = DOC) -> None:
    """Put ``markdown`` in the ``name`` section of ``doc_path`` (appended when it has none yet)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    doc = doc_path.read_text()
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    _replace(doc_path, doc)
