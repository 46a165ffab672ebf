"""Tasks of bench/bench_floor.py (importable as floor_tasks:Name with bench/ on PYTHONPATH): a ResNet-18-style
CNN on 32x32x3 images and a 6-layer BERT-style encoder built from a config (random weights, no download).
Inputs are seeded random tensors: the benchmark measures cost, not accuracy."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from indexer.task import ExampleSet, Task


class ImageExample(BaseModel):
    image: list[Any]  # 3 x 32 x 32 nested lists


class TokensExample(BaseModel):
    tokens: list[int]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity or 1x1-conv shortcut (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool; widths 64-128-256-512, two blocks each)."""

    def __init__(self, classes: int = 10, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if (j == 0 and stage > 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.layers(x).mean(dim=(2, 3)))


class ResNetTask(Task):
    example_schema = ImageExample

    def __init__(self, n: int = 512, seed: int = 0):
        self.n, self.seed = n, seed

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return ResNet18().eval()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.n, 3, 32, 32, generator=g)
        return ExampleSet(x, torch.randint(0, 10, (self.n,), generator=g), examples=lambda i: {"image": x[i].tolist()})

    def encode(self, examples: Sequence[ImageExample]) -> torch.Tensor:
        return torch.tensor([e.image for e in examples], dtype=torch.float32)


class BertTask(Task):
    """BertForSequenceClassification from a config: 6 layers, hidden 256, 4 heads, sequences of 64 tokens."""

    example_schema = TokensExample

    def __init__(self, n: int = 1024, seed: int = 0, layers: int = 6, hidden: int = 256, length: int = 64):
        self.n, self.seed, self.layers, self.hidden, self.length = n, seed, layers, hidden, length

    def build_model(self) -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(self.seed)
        config = BertConfig(vocab_size=2000, hidden_size=self.hidden, num_hidden_layers=self.layers,
                            num_attention_heads=4, intermediate_size=4 * self.hidden,
                            max_position_embeddings=self.length, num_labels=4, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config).eval()

    def training_set(self) -> ExampleSet:
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randint(1, 2000, (self.n, self.length), generator=g)
        return ExampleSet(x, torch.randint(0, 4, (self.n,), generator=g), examples=lambda i: {"tokens": x[i].tolist()})

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits

    def encode(self, examples: Sequence[TokensExample]) -> torch.Tensor:
        return torch.tensor([e.tokens for e in examples], dtype=torch.long)
