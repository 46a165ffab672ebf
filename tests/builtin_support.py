"""Runs trained and saved the way each stack saves them, for the built-in task tests (tests/test_builtin_*.py).

Nothing is downloaded: the Hugging Face models are built from a config with random weights (HF_HUB_OFFLINE=1), the
tokenizer is a real `tokenizers` word-level tokenizer saved with save_pretrained, the tabular data is
scikit-learn's wine, and the images come from Debian's dataset-fashion-mnist.
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPICS = {"sport": "goal match team player score win", "business": "bank market share price profit",
          "culture": "film actor music song award"}
WORDS = " ".join(TOPICS.values()).split()


def news_rows(n: int = 24, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose topic is the usual source of their words (80%): learnable in a few steps."""
    rng = random.Random(seed)
    names = list(TOPICS)
    rows = []
    for i in range(n):
        label = names[i % 3]
        words = TOPICS[label].split()
        text = " ".join(rng.choice(words if rng.random() < 0.8 else WORDS) for _ in range(rng.randint(3, 7)))
        pair = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"text": text, "text_b": pair, "label": label})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def word_tokenizer(max_length: int = 16):
    """A real fast tokenizer (tokenizers WordLevel + BERT-style [CLS] a [SEP] b [SEP]) over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[SEP]", model_max_length=max_length)


def tiny_bert_classifier(tokenizer, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    names = list(TOPICS)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32, num_labels=num_labels,
                        id2label=dict(enumerate(names)), label2id={k: i for i, k in enumerate(names)})
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, encoded: dict, labels: list | None):
        self.encoded, self.labels = encoded, labels

    def __len__(self):
        return len(self.encoded["input_ids"])

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.encoded.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def trainer_run(out: Path, rows: list[dict], pairs: bool = False, save_steps: int = 3, epochs: int = 2,
                lr: float = 0.5) -> Path:
    """A real transformers.Trainer run (plain SGD, linear decay) of a tiny BERT classifier on `rows`, saving its
    model and tokenizer (processing_class) every `save_steps` steps in `out`/checkpoint-N/."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = word_tokenizer()
    model = tiny_bert_classifier(tokenizer)
    encoded = tokenizer([r["text"] for r in rows], [r["text_b"] for r in rows] if pairs else None, truncation=True,
                        max_length=16)
    labels = [model.config.label2id[r["label"]] for r in rows]
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8,
                             learning_rate=lr, optim="sgd", weight_decay=0.0, save_strategy="steps",
                             save_steps=save_steps, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                             logging_steps=1, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Encoded(dict(encoded), labels),
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer).train()
    return out


def tiny_causal_lm(tokenizer, kind: str = "gpt2"):
    """A tiny GPT-2 (tied LM head) or Llama config with random weights."""
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.cls_token_id)
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=2, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def lm_run(out: Path, rows: list[dict], kind: str = "gpt2", steps: int = 4, lr: float = 0.3) -> list[Path]:
    """A causal LM trained with a plain loop (summed token loss, padding -100) and saved with save_pretrained (model
    + tokenizer) after every `steps // 2` steps, each with its lr recorded by save_checkpoint beside it."""
    from indexer.checkpoints import save_checkpoint

    tokenizer = word_tokenizer()
    model = tiny_causal_lm(tokenizer, kind)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    paths = []
    for step in range(1, steps + 1):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 2 == 0:
            paths.append(save_checkpoint(out / f"step-{step}.pt", model, optimizer, step=step))
    return paths


def wine_table(out: Path, rows: int = 40) -> tuple[Path, list[str], list[str]]:
    """scikit-learn's wine as a CSV (a seeded sample of `rows` wines, 4 features, the cultivar's name as label)."""
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    frame = data.frame.sample(n=rows, random_state=0)
    features = ["alcohol", "malic_acid", "ash", "color_intensity"]
    names = [str(n) for n in data.target_names]
    table = [{**{c: float(row[c]) for c in features}, "cultivar": names[int(row["target"])]}
             for _, row in frame.iterrows()]
    return write_csv(out, table, features + ["cultivar"]), features, names


def train_tabular(csv_path: Path, features: list[str], names: list[str], out: Path, epochs: int = 3,
                  hidden: int = 8, lr: float = 0.1) -> list[Path]:
    """A user's training: StandardScaler features, nn.Sequential MLP, SGD, torch.save(model.state_dict()) per epoch."""
    import pandas as pd
    from sklearn.preprocessing import StandardScaler
    from torch import nn

    frame = pd.read_csv(csv_path)
    x = torch.tensor(StandardScaler().fit_transform(frame[features].values), dtype=torch.float32)
    y = torch.tensor([names.index(c) for c in frame["cultivar"]])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(len(features), hidden), nn.ReLU(), nn.Linear(hidden, len(names)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(1, epochs + 1):
        for start in range(0, len(y), 8):
            loss = nn.functional.cross_entropy(model(x[start:start + 8]), y[start:start + 8])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(model.state_dict(), out / f"epoch-{epoch}.pt")
        paths.append(out / f"epoch-{epoch}.pt")
    return paths


def fashion_folder(root: Path, per_class: int = 6, classes: dict[int, str] | None = None) -> Path:
    """Fashion-MNIST training images written as root/<class>/<index>.png (an ImageFolder)."""
    from PIL import Image

    from indexer.demo.fashion_mnist import load_split

    classes = classes or {0: "tshirt", 1: "trouser", 7: "sneaker"}
    images, labels = load_split("train")
    count = {c: 0 for c in classes}
    for i in range(len(labels)):
        c = int(labels[i])
        if c in classes and count[c] < per_class:
            (root / classes[c]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(root / classes[c] / f"{i:05d}.png")
            count[c] += 1
        if all(v == per_class for v in count.values()):
            break
    return root


def toml_config(path: Path, task: str, task_args: dict, checkpoints: list, layers: list[str] | None = None,
                projection: str = "exact", compute_dtype: str = "float64", batch_size: int = 8) -> Path:
    """A config file as a user writes it (no Python): checkpoints are paths, or (path, lr) pairs."""
    from indexer.tasks.templates import toml_value

    lines = [f"task = {toml_value(task)}", f"task_args = {toml_value(task_args)}"]
    if layers:
        lines.append(f"layers = {toml_value(layers)}")
    for ckpt in checkpoints:
        ckpt_path, lr = ckpt if isinstance(ckpt, tuple) else (ckpt, None)
        lines += ["[[checkpoints]]", f"path = {toml_value(str(ckpt_path))}"] + ([f"lr = {lr!r}"] if lr else [])
    lines += ["[projection]", f"kind = {toml_value(projection)}", "dim = 64",
              "[index]", f"batch_size = {batch_size}", f"compute_dtype = {toml_value(compute_dtype)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def trainer_lrs(output_dir: Path) -> dict[int, float]:
    """step -> the lr the Trainer logged for that step (its own record, trainer_state.json's log_history)."""
    last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["learning_rate"] for e in history if "learning_rate" in e}
