"""The user documentation as a newcomer meets it.

* README.md, CHANGELOG.md, docs/*.md and examples/README.md describe the software, not how it was
  developed: no development sessions, dated run logs (UTC times, measurement dates), "tried and
  dropped" trials, issue references or "seed" tutorials. Code (fenced blocks and inline code) is
  exempt from the words that are also API names (the layers' ``seed=`` argument,
  ``torch.manual_seed``).
* README.md stays under 15 KB, and its quickstart runs verbatim (the PyTorch block too, where
  PyTorch is installed).
* Relative links between the documents point at files that exist; the extras the README installs
  exist in pyproject.toml, and the benchmark extra installs PyTorch.
* The command line: ``python -m convfast`` alone prints the help and exits 0; the help texts show
  no doubled ``%%``.
"""
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "CHANGELOG.md", ROOT / "examples" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# Checked on the whole text, code included.
EVERYWHERE = {
    "sessions": re.compile(r"\bsessions?\b", re.I),
    "UTC times": re.compile(r"\bUTC\b", re.I),
    "tried and dropped": re.compile(r"\btried\s+and\s+dropped\b", re.I),
    "dated measurements": re.compile(r"\b(measured|run|ran|timed)\b[^.\n]{0,40}\b20\d\d-\d\d-\d\d\b", re.I),
}
# Checked on the prose only: these words are also identifiers (seed=, torch.manual_seed, "issues" of
# a bug tracker in a URL).
PROSE = {
    "issues": re.compile(r"\bissues?\b|\bissue's\b", re.I),
    "seeds": re.compile(r"\bseed(s|ed|'s|s')?\b", re.I),
}


def prose(text: str) -> str:
    """The text without fenced code blocks, inline code spans and link targets."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def offending_lines(text: str, pattern: re.Pattern) -> list:
    return [line.strip() for line in text.splitlines() if pattern.search(line)]


def test_documents_found():
    assert all(p.exists() for p in DOCS), [str(p) for p in DOCS if not p.exists()]
    assert len(DOCS) >= 7


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(doc):
    text = doc.read_text()
    found = {}
    for label, pattern in EVERYWHERE.items():
        lines = offending_lines(text, pattern)
        if lines:
            found[label] = lines
    for label, pattern in PROSE.items():
        lines = offending_lines(prose(text), pattern)
        if lines:
            found[label] = lines
    assert not found, f"{doc.name} speaks of its development history: {found}"


def test_history_patterns_catch_what_they_should():
    # The checks themselves: each pattern finds the phrasing it is meant for, and the prose filter
    # spares the API's own words.
    samples = {"sessions": "the fifteenth session's final engine", "UTC times": "measured at 04:37 UTC",
               "tried and dropped": "Tried and dropped: reading zeros", "issues": "The issue suggested",
               "seeds": "the seed tutorials' examples",
               "dated measurements": "measured 2026-11-25 on the machine"}
    patterns = {**EVERYWHERE, **PROSE}
    for label, sample in samples.items():
        assert patterns[label].search(sample), label
    assert not PROSE["seeds"].search(prose("layers take `seed=0` and `torch.manual_seed(0)` works"))
    assert not PROSE["issues"].search(prose("```\nissue tracker\n```"))


def test_readme_under_15_kb():
    size = len(README.read_bytes())
    assert size < 15_000, f"README.md is {size} bytes"


def _python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def _run(code: str, tmp_path, name: str) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_readme_quickstart_runs_verbatim(tmp_path):
    blocks = _python_blocks(_section(README.read_text(), "Quickstart"))
    assert blocks, "no ```python block under ## Quickstart"
    numpy_only = [b for b in blocks if "import torch" not in b]
    assert numpy_only, "the quickstart needs a block that runs with NumPy and convfast alone"
    for i, code in enumerate(numpy_only):
        proc = _run(code, tmp_path, f"quickstart_{i}.py")
        assert proc.returncode == 0, f"quickstart block {i} failed:\n{code}\n{proc.stderr}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch not installed")
def test_readme_torch_block_runs_verbatim(tmp_path):
    blocks = [b for b in _python_blocks(_section(README.read_text(), "Quickstart")) if "import torch" in b]
    assert blocks, "the quickstart shows no PyTorch use"
    for i, code in enumerate(blocks):
        proc = _run(code + "\nassert x.grad is not None and w.grad is not None\n", tmp_path, f"torch_{i}.py")
        assert proc.returncode == 0, f"PyTorch block {i} failed:\n{code}\n{proc.stderr}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_readme_install_lines_name_real_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set(re.findall(r'pip install "?(?:\.|convfast)\[(\w+)\]', README.read_text()))
    assert {"bench", "test"} <= named, named
    assert named <= set(extras), named - set(extras)
    # The main job compares against PyTorch: its install line must bring it.
    assert any(req.replace(" ", "").startswith("torch==") for req in extras["bench"]), extras["bench"]
    torch_pins = {req for name in ("bench", "test") for req in extras[name] if req.startswith("torch")}
    assert len(torch_pins) == 1, f"the bench and test extras pin different PyTorch versions: {torch_pins}"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "convfast", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_cli_without_command_prints_help():
    proc = _cli()
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "bench" in proc.stdout and "info" in proc.stdout


@pytest.mark.parametrize("args", [(), ("--help",), ("bench", "--help")])
def test_cli_help_has_no_doubled_percent(args):
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "%%" not in proc.stdout, proc.stdout
