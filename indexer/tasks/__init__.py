"""Built-in tasks: index a model trained with a standard stack from a config alone, without writing Python.

    task = "huggingface.sequence_classification"      # a built-in name instead of "module:Class"
    task_args = { model = "run/checkpoint-60", data = "train.csv", text_column = "text", label_column = "label" }

Each built-in name stands for a `Task` subclass of this package (one module per stack), so the trust
model is unchanged: a config or an index directory's manifest names either a built-in (resolved here, to
our own modules only) or a `module:Class` Task subclass; nothing else is ever called.

This module imports nothing heavy: `indexer.store.manifest` and `indexer.config` read the tables below.
`tracin init NAME` prints a commented config for each built-in (`indexer.tasks.templates`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: built-in task name -> "module:Class" (always a module of this package)
BUILTIN_TASKS: dict[str, str] = {
    "huggingface.sequence_classification": "indexer.tasks.huggingface:SequenceClassificationTask",
    "huggingface.causal_lm": "indexer.tasks.huggingface:CausalLMTask",
    "torchvision.image_classification": "indexer.tasks.vision:ImageClassificationTask",
    "tabular.mlp": "indexer.tasks.tabular:TabularMLPTask",
}

#: the task_args of each built-in that are paths: relative ones are taken from the config file's folder
#: and written to the manifest as absolute paths (the service may run from another directory)
PATH_ARGS: dict[str, tuple[str, ...]] = {
    "huggingface.sequence_classification": ("model", "tokenizer", "data", "held_out"),
    "huggingface.causal_lm": ("model", "tokenizer", "data", "held_out"),
    "torchvision.image_classification": ("data", "held_out", "image_root"),
    "tabular.mlp": ("data", "held_out"),
}


def builtin_target(ref: str) -> str | None:
    """The "module:Class" a built-in task name stands for, or None when `ref` is not a built-in name."""
    target = BUILTIN_TASKS.get(ref)
    if target is not None and not target.startswith(__name__ + "."):  # never anything outside this package
        raise AssertionError(f"built-in task {ref!r} must live in {__name__}, not {target!r}")
    return target


def resolve_path_args(ref: str, args: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """`args` with the path arguments of built-in task `ref` made absolute (relative ones from `base_dir`,
    `~` expanded). Other tasks' arguments are returned as they are (their meaning is the task's)."""
    names = PATH_ARGS.get(ref, ())
    out = dict(args)
    for name in names:
        value = out.get(name)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            out[name] = str(path if path.is_absolute() else (Path(base_dir) / path).resolve())
    return out
