"""The README's promises: a two-command quick start, and a library example that runs as written."""
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fenced_blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_quick_start_has_exactly_two_commands():
    section = README.split("## Quick start", 1)[1]
    block = fenced_blocks(section, "")[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[0].endswith("tetsnn train") and "pytest" in lines[1]


def test_library_example_runs():
    code = fenced_blocks(README, "python")[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (8, 4, 10)
    assert scope["pred"].shape == (8,)
    assert all(p.grad is not None for p in scope["model"].parameters())


def test_front_page_is_short_and_maps_the_manual():
    root = Path(__file__).resolve().parents[1]
    assert len(README.splitlines()) <= 150
    links = re.findall(r"\]\((docs/[^)#]*)\)", README)
    assert all((root / link).exists() for link in links), links
    section = README.split("## The manual", 1)[1]
    mapped = set(re.findall(r"^- \[[^]]+\]\(docs/([\w-]+\.md)\)", section, re.M))
    pages = {page.name for page in (root / "docs").glob("*.md")} - {"index.md"}
    assert mapped == pages


def test_figures_are_those_of_the_performance_page():
    performance = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    table = README.split("## Install", 1)[0]
    figures = re.findall(r"^\|[^|\n]+\| ([\d.]+x)", table, re.M)
    assert len(figures) >= 4
    for figure in figures:
        assert re.search(rf"(?<![\d.]){re.escape(figure)}", performance), figure
