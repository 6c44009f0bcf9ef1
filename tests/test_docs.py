"""The manual (docs/, built with MkDocs) and the README: the site builds with --strict, every Python
example runs, and every ``tetsnn`` command shown uses flags its subcommand's parser has."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import tetsnn
from tetsnn import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*\Z")


def blocks(path: Path):
    """(language, code, line number, reason it is not run or None) of every fenced block of a page."""
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip()
        mark = NOT_RUN.search(before)
        found.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, mark and mark.group(1)))
    return found


def prose(path: Path) -> str:
    """A page without its fenced blocks."""
    return FENCE.sub("", path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------------- the site

def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (site / "api" / "index.html").read_text()
    for entry in re.findall(r"^::: ([\w.]+)", (ROOT / "docs" / "api.md").read_text(), re.M):
        assert f'id="{entry}"' in api, entry       # rendered, with its own anchor
    assert "Leaky integrate-and-fire neuron" in api   # from LIF's docstring
    for page in (ROOT / "docs").glob("*.md"):
        stem = "" if page.stem == "index" else page.stem + "/"
        assert (site / stem / "index.html").is_file(), page.name


def test_api_page_lists_every_public_name():
    """Every name in the ``__all__`` of tetsnn, tetsnn.analysis, tetsnn.data and tetsnn.data.events has
    one entry (a dataset class exported by both data modules is listed once, under tetsnn.data)."""
    import tetsnn.analysis
    import tetsnn.data
    import tetsnn.data.events
    listed = re.findall(r"^::: ([\w.]+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert len(listed) == len(set(listed)), "a name is listed twice"
    public = set()
    for module in (tetsnn, tetsnn.analysis, tetsnn.data, tetsnn.data.events):
        for name in module.__all__:
            owner = module
            if module is tetsnn.data.events and name in tetsnn.data.__all__:
                owner = tetsnn.data
            public.add(f"{owner.__name__}.{name}")
    assert set(listed) == public


def test_every_page_is_in_the_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    in_nav = {file for entry in nav for file in entry.values()}
    assert in_nav == {page.name for page in (ROOT / "docs").glob("*.md")}


# ----------------------------------------------------------------------------------------- Python examples

# The README's one Python block (a ResNet19 step, seconds on a CPU) is run by tests/test_readme.py.
PYTHON_PAGES = [page for page in PAGES[1:] if any(lang == "python" for lang, *_ in blocks(page))]


def test_readme_python_is_the_block_test_readme_runs():
    assert [lang for lang, *_ in blocks(ROOT / "README.md")].count("python") == 1


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=rel)
def test_python_examples_run(page, tmp_path, monkeypatch):
    """A page's Python blocks run in order in one namespace, in an empty temporary directory."""
    import torch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TETSNN_CACHE", str(tmp_path / "cache-home"))
    torch.manual_seed(0)
    scope = {"__name__": "__docs__"}
    ran = 0
    for lang, code, line, skip in blocks(page):
        if lang != "python" or skip:
            continue
        # line numbers in tracebacks are the page's
        source = "\n" * line + code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            exec(compile(source, str(page), "exec"), scope)
        ran += 1
    assert ran > 0


def test_not_run_blocks_are_few_and_say_why():
    skipped = [(rel(page), line, reason) for page in PAGES for _, _, line, reason in blocks(page) if reason]
    assert len(skipped) <= 3, skipped
    assert all(len(reason) > 10 for *_, reason in skipped), skipped
    # a marker always stands right before a block
    for page in PAGES:
        marks = len(re.findall(r"^<!--\s*not-run:", page.read_text(), re.M))
        assert marks == sum(1 for *_, reason in blocks(page) if reason), rel(page)


def test_yaml_examples_are_valid_configs():
    from tetsnn.engine.config import DEFAULTS
    found = 0
    for page in PAGES:
        for lang, code, line, _ in blocks(page):
            if lang in ("yaml", "yml"):
                cfg = yaml.safe_load(code)
                assert isinstance(cfg, dict) and set(cfg) <= set(DEFAULTS), f"{rel(page)}:{line}: {cfg}"
                found += 1
    assert found >= 2


# ----------------------------------------------------------------------------------------------- CLI flags

def commands(text: str):
    """Every ``tetsnn SUBCOMMAND ...`` in shell text (also after ``-m`` or a path): (subcommand, tokens)."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, token in enumerate(tokens[:-1]):
            if token == "tetsnn" or token.endswith("/tetsnn"):
                rest = []
                for t in tokens[i + 2:]:
                    if t in ("&", "&&", "|", ";", "||"):
                        break
                    rest.append(t)
                yield tokens[i + 1], rest


def cli_examples():
    found = []
    for page in PAGES:
        for lang, code, line, _ in blocks(page):
            if lang != "python":
                found += [(f"{rel(page)}:{line}", sub, rest) for sub, rest in commands(code)]
        for span in re.findall(r"`([^`\n]+)`", prose(page)):
            found += [(f"{rel(page)}: `{span}`", sub, rest) for sub, rest in commands(span)]
    return found


def parser_of(subcommand: str):
    module = importlib.import_module(cli.SUBCOMMANDS[subcommand][0])
    build = getattr(module, "build_parser", None)
    if build is None and subcommand == "train":
        from tetsnn.engine.config import build_parser as build
    return build()


def test_cli_examples_use_real_flags(capsys):
    examples = cli_examples()
    assert len(examples) >= 30, len(examples)          # the pages do show commands
    seen = set()
    parsers = {}
    for where, sub, rest in examples:
        if sub.startswith("-"):                        # tetsnn --help
            assert cli.main([sub]) == 0, where
            capsys.readouterr()
            continue
        assert sub in cli.SUBCOMMANDS, f"{where}: unknown subcommand {sub!r}"
        if sub not in parsers:
            parsers[sub] = set(parser_of(sub)._option_string_actions)
        for token in rest:
            flag = token.strip("[]").split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in parsers[sub], f"{where}: tetsnn {sub} has no flag {flag}"
                seen.add((sub, flag))
    assert {"train", "test", "preprocess", "profile", "export"} <= {sub for sub, _ in seen}


def test_flag_check_catches_a_wrong_flag():
    """The checker itself: a misspelt flag in a command is found, after -m and across a continuation."""
    text = "torchrun -m tetsnn train --confg x \\\n    --lr 1 &\n.venv/bin/tetsnn preprocess n-mnist --cache DIR"
    found = list(commands(text))
    assert found == [("train", ["--confg", "x", "--lr", "1"]), ("preprocess", ["n-mnist", "--cache", "DIR"])]
    assert "--confg" not in parser_of("train")._option_string_actions
    assert "--cache" not in parser_of("preprocess")._option_string_actions


# flags of other tools that the pages name on their own in the prose
OTHER_TOOLS = {"--strict": "mkdocs", "--requeue": "sbatch", "--logdir": "tensorboard", "--budget": "gpu_check.py",
               "--only": "gpu_check.py", "--render": "gpu_check.py", "--dry-run": "gpu_check.py",
               "--zoo": "bench_lif.py", "--quick": "bench_frameworks.py"}


def test_flags_named_in_prose_exist(capsys):
    """A flag named on its own (`--cache-dir`) is a flag of some subcommand, of `tetsnn` itself, or of
    one of a few other tools."""
    known = set().union(*(parser_of(sub)._option_string_actions for sub in cli.SUBCOMMANDS))
    checked = 0
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", prose(page)):
            if list(commands(span)):
                continue                                   # a whole command: checked above
            for flag in re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", span):
                checked += 1
                if flag in known or flag in OTHER_TOOLS:
                    continue
                assert cli.main([flag]) == 0, f"{rel(page)}: `{span}` names no flag of tetsnn"
                capsys.readouterr()
    assert checked >= 20, checked
