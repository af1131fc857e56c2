"""README's Python blocks and every example, run as a reader would run them (smoke tests).

The README blocks run in order in one namespace, as one session; a block that raises fails with its number
and source. Examples run as subprocesses with a tiny budget (their flags) and must exit 0 and print their
last line of results.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sympy

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the checkout
    blocks = readme_blocks()
    assert len(blocks) >= 5
    ns: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i} raised {type(e).__name__}: {e}\n{textwrap.indent(block, '    ')}")
    # What the first block's comment promises.
    flops = ns["st"].symbolic()["flops"]
    d_in, d_out = sorted(flops.free_symbols, key=str)  # the library's own symbols (integer, positive)
    promised = 8 * sympy.sqrt(d_in) * d_out + 8 * d_in * sympy.sqrt(d_out)
    assert sympy.simplify(flops - promised) == 0
    assert ns["layer"].to_dense().shape == (512, 512)  # the BTT-MoE of block 3
    assert ns["result"].train_flops <= 2e9


def _corpus(path: Path) -> Path:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(20000))
    path.write_text(text)
    return path


EXAMPLES = {
    "equal_flops.py": ["--flops", "4e9", "--width", "32"],
    "moe_layer.py": ["--width", "64", "--tokens", "256", "--reps", "1"],
    "structure_transformer.py": ["--steps", "2", "--width", "32", "--base-width", "16"],
    "moe_gpt.py": ["--data", "{corpus}", "--train-flops", "2e9"],
    "regression_frontier.py": ["--dry-run", "--out", "{tmp}/rf"],  # its 30-minute default plan, checked
    "pretrained_conversion.py": ["--data", "{corpus}", "--pretrain-steps", "3", "--finetune-steps", "2"],
    "trainer_integration.py": ["--data", "{corpus}", "--steps", "2"],
}


def test_every_example_is_smoke_tested():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(EXAMPLES)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_with_a_tiny_budget(name, tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in EXAMPLES[name]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{name} printed nothing"
