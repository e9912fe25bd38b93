"""The coordinator's text modules run where torch and transformers are not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import coordinator.catalog, coordinator.text.detokenizer, coordinator.text.tokenization
import coordinator.text.gguf_tokenizer
from pathlib import Path
if len(sys.argv) > 1:  # a GGUF file: its tokenizer is built from the header alone
    coordinator.text.tokenization.ModelTokenizer.from_gguf(Path(sys.argv[1])).encode_prompt("hi")
heavy = {"torch", "transformers", "numpy", "gguf"}
print(",".join(sorted(name for name in sys.modules if name.split(".")[0] in heavy)))
"""


def test_imports_pull_in_neither_torch_nor_transformers() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_a_gguf_tokenizer_needs_neither_torch_nor_numpy_nor_gguf(smollm2_gguf: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(smollm2_gguf)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_probe_would_notice_torch() -> None:
    """The probe is not vacuous: importing the miner's test model does pull torch in."""
    probe = PROBE.replace("import sys\n", "import sys\nimport miner.test_model, torch\n")
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout.split(",")
