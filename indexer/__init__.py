"""tracin-service indexer: TracIn gradient embeddings and index directories for PyTorch models.

TracInCP(z, z') = sum_i lr_i * grad l(w_i, z) . grad l(w_i, z')   over checkpoints w_i.
Each example is embedded as concat_i sqrt(lr_i) * P_i g_i(z) so that TracInCP ~= e(z) . e(z').
"""
from indexer.task import ExampleSet, Task
from indexer.checkpoints import save_checkpoint, load_checkpoint

__version__ = "0.1.0"
__all__ = ["Task", "ExampleSet", "save_checkpoint", "load_checkpoint", "__version__"]
