"""tracin-service indexer: TracIn gradient embeddings and index directories for PyTorch models.

TracIn(z, z') = sum_i <grad l(w_i, z), s_i (.) grad l(w_i, z')> over checkpoints w_i, with s_i the step
the optimizer took per coordinate (lr of each parameter group; lr * Gamma for Adam-type optimizers).
Each example is embedded as sum_i P_i (sqrt(s_i) (.) g_i(z)) so that TracIn ~= e(z) . e(z').
"""
from indexer.task import ExampleSet, Task
from indexer.checkpoints import save_checkpoint, load_checkpoint

__version__ = "0.1.0"
__all__ = ["Task", "ExampleSet", "save_checkpoint", "load_checkpoint", "__version__"]
