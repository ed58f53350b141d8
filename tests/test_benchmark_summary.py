"""The benchmark summary page can be rebuilt from the committed results."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_writes_the_results_page(tmp_path):
    out = tmp_path / "results.md"
    subprocess.run(
        [sys.executable, str(ROOT / "examples/benchmarks/summarize.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    text = out.read_text()
    assert "Residual flows against normflows" in text
    assert "Reversible back-propagation" in text
    assert "| A | ours |" in text and "| 64 | ours |" in text
    assert "| fit default |" in text
