"""Commented configs for the built-in tasks (`tracin init NAME`) and the config `tracin index --trainer-dir` writes.

A template is a working config once its paths are edited: every other value is the task's default or an
example of the setting, with a comment saying what it must match in training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from indexer.tasks import BUILTIN_TASKS

_TAIL = '''
[projection]
kind = "sketch"          # 512 numbers per example; the service re-ranks candidates by exact TracIn
dim = 512
# kind = "exact"         # whole gradients: small models (or few traced layers) only

[index]
factory = "Flat"         # exact inner-product search
batch_size = 32
device = "cpu"           # "cuda" where available
'''

_CHECKPOINTS = '''
# The checkpoints TracIn looks at, in training order. lr: the learning rate of the last optimizer step before
# each one; leave it out for files that record it (indexer.checkpoints.save_checkpoint, the TracIn
# callbacks, a Trainer's checkpoint-N/ folders).
[[checkpoints]]
path = "{first}"{lr}

[[checkpoints]]
path = "{last}"{lr}
'''
_LR = "\nlr = 0.1"

TEMPLATES: dict[str, str] = {
    "huggingface.sequence_classification": '''# tracin-service config: a Hugging Face sequence classifier (AutoModelForSequenceClassification).
# Paths are relative to this file. Index: tracin index THIS_FILE --out index; serve: tracin serve index
task = "huggingface.sequence_classification"
# layers = ["classifier*"]            # trace only these modules (default: every trainable parameter)

[task_args]
model = "output_dir/checkpoint-500"   # a save_pretrained folder: config.json + the tokenizer's files
# tokenizer = "tokenizer_dir"         # when the tokenizer is saved elsewhere
data = "train.csv"                    # the training rows (.csv .tsv .jsonl .json .parquet, or a datasets folder)
text_column = "text"
# text_pair_column = "text_b"         # sentence pairs: the second text
label_column = "label"                # class ids, or names of the model config's label2id
# max_length = 128                    # tokens per text, as in training (default: the tokenizer's, at most 512)
# id_column = "id"                    # row ids shown by the service (default: the row number)
# held_out = "test.csv"               # example queries offered by the service (same columns)
# split = "train"                     # the split of a datasets folder saved with save_to_disk

''' + _CHECKPOINTS.format(first="output_dir/checkpoint-250", last="output_dir/checkpoint-500", lr="") + _TAIL,

    "huggingface.causal_lm": '''# tracin-service config: a Hugging Face causal language model (AutoModelForCausalLM); influence on the
# summed next-token loss of a text. Paths are relative to this file.
task = "huggingface.causal_lm"
# layers = ["lm_head", "*.mlp.*"]     # trace only these modules (default: every trainable parameter)

[task_args]
model = "output_dir/checkpoint-500"   # a save_pretrained folder: config.json + the tokenizer's files
data = "train.jsonl"                  # the training texts (.csv .tsv .jsonl .json .parquet, or a datasets folder)
text_column = "text"
# max_length = 256                    # tokens per text, as in training (default: the tokenizer's, at most 512)
# held_out = "valid.jsonl"            # example queries offered by the service

''' + _CHECKPOINTS.format(first="output_dir/checkpoint-250", last="output_dir/checkpoint-500", lr="") + _TAIL,

    "torchvision.image_classification": '''# tracin-service config: a torchvision image classifier. Paths are relative to this file.
task = "torchvision.image_classification"
layers = ["fc"]                       # the last layer (the name depends on arch: "classifier.*" for many)

[task_args]
arch = "resnet18"                     # torchvision.models.get_model name
num_classes = 10
data = "images/train"                 # images/train/<class>/*.png (ImageFolder), or a table of path + label
# path_column = "path"                # a table's image paths (relative to image_root, default: the table's folder)
# label_column = "label"              # a table's labels: class ids, or names listed in classes
# classes = ["cat", "dog"]            # class names in id order (an image folder's are its sorted subfolders)
mode = "RGB"                          # "L": one channel
resize = 256                          # the transforms of training, in this order: Resize, CenterCrop,
center_crop = 224                     # ToImage + ToDtype(float32, scale=True), Normalize(mean, std)
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
# held_out = "images/val"             # example queries offered by the service

''' + _CHECKPOINTS.format(first="checkpoints/epoch-05.pt", last="checkpoints/epoch-10.pt", lr=_LR) + _TAIL,

    "tabular.mlp": '''# tracin-service config: an MLP on a table (nn.Sequential(Linear, ReLU, ..., Linear) trained on
# standardised features: (x - mean) / std of the training rows, as scikit-learn's StandardScaler).
# Paths are relative to this file.
task = "tabular.mlp"

[task_args]
data = "train.csv"                    # the training rows (.csv .tsv .jsonl .json .parquet, or a datasets folder)
feature_columns = ["x1", "x2"]        # in the model's input order (default: every column but label and id)
label_column = "label"
hidden = [64]                         # hidden layer sizes: Linear(d, 64), ReLU, Linear(64, num_classes)
num_classes = 2                       # or classes = ["no", "yes"] (names in id order, when labels are names)
# activation = "relu"                 # relu, tanh, gelu, sigmoid, silu
# label_kind = "regression"           # a numeric target (one output) instead of classes
# standardize = false                 # the model takes the raw features
# held_out = "test.csv"               # example queries offered by the service
''' + _CHECKPOINTS.format(first="checkpoints/epoch-05.pt", last="checkpoints/epoch-10.pt", lr=_LR) + _TAIL,
}

assert set(TEMPLATES) == set(BUILTIN_TASKS)


def toml_value(value: Any) -> str:
    """A TOML value for a str / bool / int / float / list / dict (inline table) of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


#: first line of a config written by `tracin index --trainer-dir` (such a file may be rewritten by it)
TRAINER_HEADER = "# written by `tracin index --trainer-dir`"


def trainer_config(task: str, task_args: dict[str, Any], checkpoints: list[Path], command: str, out: Path) -> str:
    """The config `tracin index --trainer-dir` writes: the task, its arguments, the Trainer's checkpoint folders in
    step order (their lr is read from the folders), the default projection and index."""
    import shlex

    again = shlex.join(["tracin", "index", f"{out.name}.toml", "--out", out.name])
    lines = [TRAINER_HEADER, f"# {command}", f"# Repeat the build with: {again}",
             f"task = {toml_value(task)}", "# layers = [\"classifier*\"]   # trace only these modules (default: all)",
             "", "[task_args]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in task_args.items() if v is not None]
    for path in checkpoints:
        lines += ["", "[[checkpoints]]", f"path = {toml_value(str(path))}"]
    return "\n".join(lines) + "\n" + _TAIL
