"""tracin-service indexer: TracIn gradient embeddings and index directories for PyTorch models.

TracInCP(z, z') = sum_i lr_i * grad l(w_i, z) . grad l(w_i, z')   over checkpoints w_i.
Each example is embedded as concat_i sqrt(lr_i) * P_i g_i(z) so that TracInCP ~= e(z) . e(z').

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
