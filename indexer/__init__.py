"""tracin-service indexer: TracIn gradient embeddings and index directories for PyTorch models.

TracIn(z, z') = sum_i <grad l(w_i, z), s_i (.) grad l(w_i, z')> over checkpoints w_i, with s_i the step
the optimizer took per coordinate (lr of each parameter group; lr * Gamma for Adam-type optimizers).
Each example is embedded as sum_i P_i (sqrt(s_i) (.) g_i(z)) so that TracIn ~= e(z) . e(z').

The names below are imported on first use (PEP 562), so that `import indexer` (and `tracin --version`,
`tracin --help`) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Task", "ExampleSet", "save_checkpoint", "load_checkpoint", "__version__"]

_LAZY = {"Task": "indexer.task", "ExampleSet": "indexer.task", "save_checkpoint": "indexer.checkpoints",
         "load_checkpoint": "indexer.checkpoints"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
