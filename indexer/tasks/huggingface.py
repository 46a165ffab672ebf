"""Built-in tasks for Hugging Face transformers models: `huggingface.sequence_classification` and
`huggingface.causal_lm`.

    task = "huggingface.sequence_classification"
    task_args = { model = "out/checkpoint-60", data = "train.csv", text_column = "text", label_column = "label" }

`model` is a folder saved with `save_pretrained` (a Trainer's `checkpoint-N/` folder is one): its config.json
says which architecture `AutoModelForSequenceClassification` / `AutoModelForCausalLM` builds, and its tokenizer
files are read with `AutoTokenizer` (`tokenizer` names another folder). Everything is loaded from disk only
(HF_HUB_OFFLINE=1, local_files_only=True): no hub name is ever resolved. The weights of each checkpoint come
from the config's [[checkpoints]] (a `checkpoint-N/` folder, a model.safetensors, a state dict).

Data: a table (CSV / TSV / JSONL / JSON / Parquet / a `datasets` folder, `indexer.tasks.data`) in the row
order of the index, with a text column (and `text_pair_column` for sentence pairs) and, for classification,
a label column: class ids, or class names of the model config's `label2id` ("positive" -> 1); a name the
config does not know is refused in one line. A model with one output (`num_labels = 1` or
`problem_type = "regression"`) takes numeric targets (squared error).

Texts are tokenized as in training: truncated to `max_length` tokens (default: the tokenizer's
`model_max_length`, at most 512) and padded; set `max_length` to what training used.

Losses (per example, summed, never averaged): classification: cross-entropy of the logits (regression:
squared error); causal LM: the summed next-token cross-entropy of the text's tokens, padding excluded
(labels are the input ids with -100 on padding, shifted by one as the model's own loss does). The JSON
example is {"text": ...} ({"text", "text_pair"} for pairs); a training example displays its text.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from indexer.config import ConfigError
from indexer.task import ExampleSet, Inputs, Task
from indexer.tasks.data import class_ids, float_values, read_table, snippet

HF_EXTRA = "pip install 'tracin-service[huggingface]'"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
DEFAULT_MAX_LENGTH = 512
SNIPPET_CHARS = 300


class TextExample(BaseModel):
    """One text (what POST /influence accepts for this task)."""

    text: str = Field(min_length=1, max_length=100_000, description="the text, as in the training data's text column")


class TextPairExample(BaseModel):
    """A pair of texts (sentence-pair classification: premise / hypothesis, question / passage)."""

    text: str = Field(min_length=1, max_length=100_000, description="the first text (text_column)")
    text_pair: str = Field(min_length=1, max_length=100_000, description="the second text (text_pair_column)")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never a download
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"task: the built-in Hugging Face tasks need transformers: {HF_EXTRA}") from None
    return transformers


def _folder(value: Any, arg: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"task_args.{arg}: expected the path of a folder saved with save_pretrained, got {value!r}")
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"task_args.{arg}: {path} is not a folder (a model saved with save_pretrained, e.g. a "
                          "Trainer's checkpoint-N/)")
    return path


@lru_cache(maxsize=8)
def _config(path: str):
    transformers = _transformers()
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"task_args.model: {path} has no config.json (a model folder saved with save_pretrained)")
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers' errors: a bad folder for the user
        raise ConfigError(f"task_args.model: cannot read {path}/config.json: {type(exc).__name__}: "
                          f"{_line(exc)}") from None


@lru_cache(maxsize=8)
def _tokenizer(path: str, arg: str):
    transformers = _transformers()
    folder = Path(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        hint = ("give its folder as task_args.tokenizer, or save it there with tokenizer.save_pretrained (a "
                "Trainer saves it in every checkpoint when given processing_class=tokenizer)")
        raise ConfigError(f"task_args.{arg}: the tokenizer is missing from {folder} (none of "
                          f"{', '.join(TOKENIZER_FILES[:3])}, ...): {hint}")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"task_args.{arg}: cannot load the tokenizer of {folder}: {type(exc).__name__}: "
                          f"{_line(exc)}") from None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def _texts(values: Sequence[Any], where: str) -> list[str]:
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: row {row}: {type(value).__name__} {repr(value)[:40]}, not a text")
    return list(values)


class _HFTask(Task):
    """What both Hugging Face tasks share: the model folder, the tokenizer, the table, tokenization."""

    auto_class = ""  # the transformers Auto* class that builds the model from its config

    def __init__(self, model: str, data: str, text_column: str = "text", tokenizer: str | None = None,
                 max_length: int | None = None, id_column: str | None = None, held_out: str | None = None,
                 split: str | None = None, seed: int = 0):
        self.model_dir = _folder(model, "model")
        self.config = _config(str(self.model_dir))
        tokenizer_dir = _folder(tokenizer, "tokenizer") if tokenizer is not None else self.model_dir
        self.tokenizer = _tokenizer(str(tokenizer_dir), "tokenizer" if tokenizer is not None else "model")
        limit = getattr(self.tokenizer, "model_max_length", None) or DEFAULT_MAX_LENGTH
        if max_length is None:
            max_length = min(int(limit), DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ConfigError(f"task_args.max_length: expected a number of tokens >= 2, got {max_length!r}")
        self.max_length, self.seed = max_length, seed
        self.model_name = f"{self.auto_class} of {self.model_dir}/config.json ({type(self.config).__name__})"
        self.table = read_table(data, split)
        self.text_column = self.table.require(text_column, "text_column")
        self.id_column = self.table.require(id_column, "id_column") if id_column is not None else None
        self.held_out = read_table(held_out, None, "held_out") if held_out is not None else None
        try:
            self._auto().from_config  # noqa: B018 - the class exists in this transformers
        except AttributeError:
            raise ConfigError(f"task: this transformers has no {self.auto_class}: {HF_EXTRA}") from None

    def _auto(self):
        return getattr(_transformers(), self.auto_class)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # every weight is then replaced by a checkpoint's
        try:
            return self._auto().from_config(self.config)
        except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
            raise ConfigError(f"task_args.model: {self.model_dir}/config.json ({type(self.config).__name__}) has no "
                              f"{self.auto_class} architecture: {_line(exc)}") from None

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        return model(**inputs).logits

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Token tensors [N, T] (input_ids, attention_mask and what else the tokenizer gives), T = the longest
        of `texts` after truncation to max_length."""
        encoded = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                                 max_length=self.max_length, padding="longest", return_tensors="pt")
        return {name: value for name, value in encoded.items() if isinstance(value, torch.Tensor)}

    def _ids(self, table, arg: str) -> list[str] | None:
        if self.id_column is None:
            return None
        ids = [str(v) for v in table.column(self.id_column, arg)]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"task_args.id_column: column {self.id_column!r} of {table.path} repeats ids")
        return ids

    def training_set(self) -> ExampleSet:
        return self._set(self.table, "data")

    def held_out_set(self) -> ExampleSet | None:
        return self._set(self.held_out, "held_out") if self.held_out is not None else None

    def _set(self, table, arg: str) -> ExampleSet:
        raise NotImplementedError


class SequenceClassificationTask(_HFTask):
    """Built-in `huggingface.sequence_classification` (see the module docstring). Arguments (task_args):

    model: a save_pretrained folder (config.json; the tokenizer too unless `tokenizer` names its folder);
    data: the training table; text_column: "text"; text_pair_column: the second text of pairs (optional);
    label_column: "label"; max_length: tokens per text (default: the tokenizer's, at most 512); id_column:
    ids of the rows (default: the row number); held_out: a table of the same columns offered as example
    queries; split: the split of a `datasets` folder. Raises ConfigError (one line naming the argument)."""

    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, model: str, data: str, text_column: str = "text", label_column: str = "label",
                 text_pair_column: str | None = None, **kwargs: Any):
        super().__init__(model, data, text_column, **kwargs)
        self.label_column = self.table.require(label_column, "label_column")
        self.text_pair_column = (self.table.require(text_pair_column, "text_pair_column")
                                 if text_pair_column is not None else None)
        config = self.config
        if getattr(config, "problem_type", None) == "multi_label_classification":
            raise ConfigError(f"task_args.model: {self.model_dir} is a multi-label classifier (problem_type "
                              "multi_label_classification), which this built-in task does not read; write a Task")
        if config.num_labels == 1 or getattr(config, "problem_type", None) == "regression":
            self.label_kind = "regression"
        else:
            self.label_kind = "class"
            id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
            self.class_names = [id2label.get(i, str(i)) for i in range(config.num_labels)]
        self.example_schema = TextPairExample if self.text_pair_column is not None else TextExample
        if self.tokenizer.pad_token is None:
            raise ConfigError(f"task_args.model: the tokenizer of {self.model_dir} has no pad token, so examples "
                              "cannot share a batch; set one (tokenizer.pad_token = tokenizer.eos_token and "
                              "model.config.pad_token_id = tokenizer.pad_token_id, as training must have) and save it")
        self.labels = self._labels(self.table)
        if self.held_out is not None:
            for name in (self.text_column, self.label_column, self.text_pair_column):
                if name is not None:
                    self.held_out.require(name, "held_out")

    def _labels(self, table) -> torch.Tensor:
        where = f"task_args.label_column ({table.path.name} column {self.label_column!r})"
        values = table.column(self.label_column, "label_column")
        if self.label_kind == "regression":
            return torch.tensor(float_values(values, where), dtype=torch.float32)
        return class_ids(values, self.class_names, where)

    def _set(self, table, arg: str) -> ExampleSet:
        texts = _texts(table.column(self.text_column, arg), f"task_args.text_column ({table.path.name})")
        pairs = (_texts(table.column(self.text_pair_column, arg), f"task_args.text_pair_column ({table.path.name})")
                 if self.text_pair_column is not None else None)
        labels = self.labels if table is self.table else self._labels(table)

        def example(i: int) -> dict[str, Any]:
            return {"text": texts[i], **({"text_pair": pairs[i]} if pairs is not None else {})}

        def display(i: int) -> dict[str, Any]:
            return {"text": snippet(texts[i], SNIPPET_CHARS),
                    **({"text_pair": snippet(pairs[i], SNIPPET_CHARS)} if pairs is not None else {})}

        return ExampleSet(self.tokenize(texts, pairs), labels, ids=self._ids(table, arg), display=display,
                          examples=example)

    def encode(self, examples: Sequence[BaseModel]) -> dict[str, torch.Tensor]:
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if self.text_pair_column is not None else None
        return self.tokenize(texts, pairs)


class CausalLMTask(_HFTask):
    """Built-in `huggingface.causal_lm` (see the module docstring): influence on the summed next-token loss of a
    text. Arguments (task_args): model, data, text_column ("text"), tokenizer, max_length, id_column, held_out,
    split, as for `huggingface.sequence_classification`. A tokenizer without a pad token pads with its end of
    text token (padding is masked out of the loss and the attention). The query's loss is the model's own
    greedy next tokens unless a `label` (the text's token ids, as GET /examples/{id} shows them) is sent."""

    auto_class = "AutoModelForCausalLM"
    label_kind = "class"  # a class (the next token) per position

    def __init__(self, model: str, data: str, text_column: str = "text", **kwargs: Any):
        super().__init__(model, data, text_column, **kwargs)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"task_args.model: the tokenizer of {self.model_dir} has neither a pad token nor an "
                                  "end-of-text token to pad with")
            self.tokenizer = _padded_copy(self.tokenizer)
        self.example_schema = TextExample

    def _set(self, table, arg: str) -> ExampleSet:
        texts = _texts(table.column(self.text_column, arg), f"task_args.text_column ({table.path.name})")
        inputs = self.tokenize(texts)
        return ExampleSet(inputs, self.labels_of(inputs), ids=self._ids(table, arg),
                          display=lambda i: {"text": snippet(texts[i], SNIPPET_CHARS)},
                          examples=lambda i: {"text": texts[i]})

    @staticmethod
    def labels_of(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """int64 [N, T]: the input ids with -100 where attention_mask is 0 (padding)."""
        return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def encode(self, examples: Sequence[BaseModel]) -> dict[str, torch.Tensor]:
        return self.tokenize([e.text for e in examples])

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy per example [B]: logits [B, T, V] at position t predict labels[t + 1];
        labels -100 (padding) add nothing."""
        logits = outputs[:, :-1, :]
        target = labels[:, 1:].to(torch.long)
        per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        return per_token.sum(dim=1)

    def predict(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(labels of the model's greedy next tokens [B, T] in the loss's layout: -100 at position 0, then the
        arg-max token predicted at t - 1; None: no probabilities for a whole sequence)."""
        greedy = outputs.argmax(dim=-1)
        labels = torch.full_like(greedy, -100)
        labels[:, 1:] = greedy[:, :-1]
        return labels, None


def _padded_copy(tokenizer):
    import copy

    padded = copy.deepcopy(tokenizer)  # the cached tokenizer stays as loaded
    padded.pad_token = padded.eos_token
    return padded
