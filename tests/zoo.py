"""The model zoo: every layer kind users bring, as tiny seeded tasks (importable as tests.zoo:Name).

Each task is small enough for a brute-force float64 oracle (one torch.autograd.grad per example) and has
a JSON schema + encode, so it can also be indexed with `tracin index` and served over HTTP. Every capture
change runs against all of them (tests/test_zoo.py)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from indexer.task import ExampleSet, Task

N = 12  # training examples
Q = 3  # held-out examples
SEQ = 4  # sequence length; the zoo tests also index with batch_size = SEQ (T == B)


class ZooExample(BaseModel):
    """One example as nested lists (the task's `encode` turns them into its input tensors)."""

    x: list[Any]


class PairExample(BaseModel):
    x: list[Any]
    z: list[Any]


class ZooTask(Task):
    """Base: float64 inputs [N, *shape] with class labels; subclasses set the model and the data."""

    example_schema = ZooExample
    classes = 3
    input_shape: tuple[int, ...] = (6,)
    integer_inputs = 0  # > 0: token ids in 0..integer_inputs-1
    dtype = torch.float64
    adamw = True  # trainable by torch.optim.AdamW (tests/conftest.make_adamw_checkpoints)

    def __init__(self, seed: int = 0, n: int = N):
        self.seed, self.n = seed, n

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.make_model().to(self.dtype)

    def _inputs(self, count: int, offset: int):
        g = torch.Generator().manual_seed(self.seed * 100 + offset)
        if self.integer_inputs:
            x = torch.randint(1, self.integer_inputs, (count, *self.input_shape), generator=g)
        else:
            x = torch.randn(count, *self.input_shape, generator=g, dtype=torch.float64).to(self.dtype)
        return x

    def _labels(self, count: int, offset: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100 + offset + 50)
        return torch.randint(0, self.classes, (count,), generator=g)

    def _set(self, count: int, offset: int, prefix: str) -> ExampleSet:
        x, y = self._inputs(count, offset), self._labels(count, offset)
        return ExampleSet(x, y, ids=[f"{prefix}{i}" for i in range(count)],
                          display=lambda i: {"row": i},
                          examples=lambda i: {"x": x[i].tolist()})

    def training_set(self) -> ExampleSet:
        return self._set(self.n, 1, "t")

    def held_out_set(self) -> ExampleSet:
        return self._set(Q, 2, "q")

    def encode(self, examples: Sequence[ZooExample]) -> torch.Tensor:
        if self.integer_inputs:
            return torch.tensor([e.x for e in examples], dtype=torch.long)
        return torch.tensor([e.x for e in examples], dtype=torch.float64).to(self.dtype)


# -- plain ------------------------------------------------------------------------------------------

class MLP(ZooTask):
    def make_model(self):
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu_(self.conv2(x))  # in-place on a traced output on purpose
        return self.fc(x.flatten(1))


class CNN(ZooTask):
    input_shape = (1, 7, 7)

    def make_model(self):
        return _CNN()


# -- shared and tied parameters ------------------------------------------------------------------------

class _TiedLM(nn.Module):
    """Embedding and LM head share one tensor (head.weight = emb.weight), as every language model does."""

    def __init__(self, vocab=9, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))  # [B, T, E]
        return self.head(h.mean(1))


class TiedLMHead(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9
    classes = 9

    def make_model(self):
        return _TiedLM()


class _FunctionalTie(nn.Module):
    """The head reuses the embedding matrix functionally (no module call), the GPT-2 way."""

    def __init__(self, vocab=9, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        return h @ self.emb.weight.T


class FunctionalTie(TiedLMHead):
    def make_model(self):
        return _FunctionalTie()


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class CalledTwice(ZooTask):
    def make_model(self):
        return _CalledTwice()


class _FrozenPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.encoder.requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.encoder(x))
        return self.head(h)


class FrozenEncoder(ZooTask):
    def make_model(self):
        return _FrozenPart()


class _WeightNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class WeightNorm(ZooTask):
    def make_model(self):
        return _WeightNorm()


# -- layouts where rows are not examples -----------------------------------------------------------

class _SeqFirst(nn.Module):
    """A Linear applied to [T, B, E] activations (the default layout of nn.LSTM / nn.Transformer)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, 3]
        h = torch.tanh(self.proj(x.transpose(0, 1)))  # [T, B, 5]
        return self.head(h.mean(0))


class SeqFirstLinear(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _SeqFirst()


class _Positions(nn.Module):
    """Position ids of shape [1, T] broadcast over the batch (BERT's position embedding)."""

    def __init__(self, vocab=9, dim=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(SEQ, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = torch.tanh(self.tok(ids) + self.pos(positions))
        return self.head(h.mean(1))


class BroadcastPositions(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        return _Positions()


class _RowZeroInLargeBatches(_Positions):
    """Reads the shared position row 0 explicitly, but only in batches of more than 4 examples: in the planner's
    batch of 3 and the self-check's 4 checked rows it looks like BroadcastPositions."""

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        p = self.pos(positions)
        h = torch.tanh(self.tok(ids) + (p[0] if ids.shape[0] > 4 else p))
        return self.head(h.mean(1))


class RowZeroInLargeBatches(BroadcastPositions):
    def make_model(self):
        return _RowZeroInLargeBatches()


class _Folded(nn.Module):
    """Inputs [B, N, F] folded to [B*N, F] for a shared per-item Linear, then unfolded."""

    def __init__(self):
        super().__init__()
        self.item = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        B, n, f = x.shape
        h = torch.tanh(self.item(x.reshape(B * n, f))).reshape(B, n, -1)
        return self.head(h.sum(1))


class FoldedBatch(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _Folded()


# -- recurrent and attention ------------------------------------------------------------------------

class _RNN(nn.Module):
    def __init__(self, kind, batch_first: bool):
        super().__init__()
        self.rnn = kind(3, 4, batch_first=batch_first)
        self.batch_first = batch_first
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 3]
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class LSTM(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _RNN(nn.LSTM, batch_first=True)


class GRU(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _RNN(nn.GRU, batch_first=False)


class _Attention(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.batch_first = batch_first
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        o, _ = self.att(h, h, h)
        if not self.batch_first:
            o = o.transpose(0, 1)
        return self.head(o.mean(1))


class MultiheadAttention(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _Attention(True)


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.batch_first = batch_first
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        o = self.enc(h)
        if not self.batch_first:
            o = o.transpose(0, 1)
        return self.head(o.mean(1))


class TransformerBatchFirst(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _Encoder(True)


class TransformerSeqFirst(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _Encoder(False)


# -- examples mixed by the batch ----------------------------------------------------------------------

class _BatchStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


class BatchStatsNorm(ZooTask):
    input_shape = (1, 7, 7)

    def make_model(self):
        return _BatchStats()


class _BatchStats1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4, track_running_stats=False)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class BatchStatsNorm1d(ZooTask):
    """BatchNorm1d with batch statistics cannot run on one example alone: refused."""

    def make_model(self):
        return _BatchStats1d()


# -- labels that are not class ids ------------------------------------------------------------------------

class Regression(ZooTask):
    label_kind = "regression"

    def make_model(self):
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, model, inputs):
        return model(inputs).squeeze(-1)  # [B]: drops the feature axis only

    def _labels(self, count, offset):
        g = torch.Generator().manual_seed(self.seed * 100 + offset + 50)
        return torch.randn(count, generator=g, dtype=torch.float64)


class MultiOutputRegression(Regression):
    def make_model(self):
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, model, inputs):
        return model(inputs)

    def _labels(self, count, offset):
        g = torch.Generator().manual_seed(self.seed * 100 + offset + 50)
        return torch.randn(count, 2, generator=g, dtype=torch.float64)


class MultiLabel(ZooTask):
    label_kind = "multilabel"
    class_names = ["red", "green", "blue", "round"]

    def make_model(self):
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))

    def _labels(self, count, offset):
        g = torch.Generator().manual_seed(self.seed * 100 + offset + 50)
        return (torch.rand(count, 4, generator=g) > 0.5).to(torch.float32)


# -- precision and odd inputs ------------------------------------------------------------------------------

class BFloat16(ZooTask):
    dtype = torch.bfloat16

    def make_model(self):
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class _MaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, max_norm=1.0)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class EmbeddingMaxNorm(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        return _MaxNorm()


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.head(torch.tanh(self.a(x) + self.b(z)))


class TupleInputs(ZooTask):
    example_schema = PairExample

    def make_model(self):
        return _Pair()

    def _set(self, count, offset, prefix):
        g = torch.Generator().manual_seed(offset)
        x = torch.randn(count, 6, generator=g, dtype=torch.float64)
        z = torch.randn(count, 2, generator=g, dtype=torch.float64)
        y = self._labels(count, offset)
        return ExampleSet((x, z), y, ids=[f"{prefix}{i}" for i in range(count)],
                          examples=lambda i: {"x": x[i].tolist(), "z": z[i].tolist()})

    def encode(self, examples):
        return (torch.tensor([e.x for e in examples], dtype=torch.float64),
                torch.tensor([e.z for e in examples], dtype=torch.float64))


class _Squeezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x).squeeze()  # drops the batch axis of a batch of one


class SqueezeOutput(ZooTask):
    """A forward ending in .squeeze(): a batch of one loses its batch axis. Refused before indexing."""

    def make_model(self):
        return _Squeezed()


class _CausalLM(nn.Module):
    """Next-token prediction with a tied head: logits [B, T, V] for every position."""

    def __init__(self, vocab=9, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(SEQ, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = torch.tanh(self.mix(self.emb(ids) + self.pos(positions)))
        return self.head(torch.cumsum(h, dim=1) / torch.arange(1, ids.shape[1] + 1, device=ids.device).view(1, -1, 1))


class CausalLM(ZooTask):
    """Labels are the next token at every position ([N, T] ids): a class per position."""

    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        return _CausalLM()

    def _labels(self, count, offset):
        g = torch.Generator().manual_seed(self.seed * 100 + offset + 50)
        return torch.randint(2, 9, (count, SEQ), generator=g)

    def loss(self, outputs, labels):
        per_token = torch.nn.functional.cross_entropy(outputs.transpose(1, 2), labels, reduction="none")
        return per_token.sum(dim=1)


# -- gradient checkpointing inside forward (issue 22) ---------------------------------------------------

import functools  # noqa: E402

import torch.utils.checkpoint  # noqa: E402
from torch.utils.checkpoint import checkpoint as checkpoint_by_name, checkpoint_sequential  # noqa: E402


class _Checkpointed(nn.Module):
    """A block run through torch.utils.checkpoint: reentrant via the module attribute, non-reentrant via a
    name imported from it, or through a functools.partial of it (as Hugging Face holds it)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        self.head = nn.Linear(5, 3)
        self.partial = functools.partial(checkpoint_by_name, use_reentrant=True)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.how == "reentrant":
            h = h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
        elif self.how == "non-reentrant":
            h = h + checkpoint_by_name(self.block, h, use_reentrant=False)
        else:
            h = h + self.partial(self.block, h)
        return self.head(torch.tanh(h))


class CheckpointReentrant(ZooTask):
    def make_model(self):
        return _Checkpointed("reentrant")


class CheckpointNonReentrant(ZooTask):
    def make_model(self):
        return _Checkpointed("non-reentrant")


class CheckpointPartial(ZooTask):
    def make_model(self):
        return _Checkpointed("partial")


class _CheckpointSequential(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(6, 5)
        self.layers = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return checkpoint_sequential(self.layers, 2, torch.tanh(self.inp(x)), use_reentrant=self.reentrant)


class CheckpointSequential(ZooTask):
    def make_model(self):
        return _CheckpointSequential(reentrant=False)


class CheckpointSequentialReentrant(ZooTask):
    def make_model(self):
        return _CheckpointSequential(reentrant=True)


class _SwinStyleBlock(nn.Module):
    """A timm/Swin-style block: each residual branch runs through checkpoint inside the block's own forward
    whenever `grad_checkpointing` is set (whatever the training mode, as timm does)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.grad_checkpointing = True
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _attention(self, x):
        y = self.norm1(x)
        return self.attn(y, y, y, need_weights=False)[0]

    def _feed_forward(self, x):
        return self.mlp(self.norm2(x))

    def forward(self, x):
        if self.grad_checkpointing:
            x = x + checkpoint_by_name(self._attention, x, use_reentrant=False)
            return x + torch.utils.checkpoint.checkpoint(self._feed_forward, x, use_reentrant=True)
        return self._feed_forward(x + self._attention(x)) + x


class _Swin(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.blocks = nn.Sequential(_SwinStyleBlock(), _SwinStyleBlock())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)).mean(1))


class SwinCheckpointed(ZooTask):
    input_shape = (SEQ, 3)

    def make_model(self):
        return _Swin()


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
                        max_position_embeddings=SEQ, type_vocab_size=1, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.3)
    return BertForSequenceClassification(config)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=9, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=SEQ, num_labels=3, pad_token_id=0,
                         initializer_range=0.3)
    return LlamaForSequenceClassification(config)


class _AlwaysTraining(nn.Module):
    """Holds a Hugging Face model that stays in training mode (dropout 0), so that its
    gradient_checkpointing_enable() is in force while it is indexed (HF checkpoints only in training mode)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.hf.gradient_checkpointing_enable()

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.train(True)
        return self

    def forward(self, ids):
        return self.hf(input_ids=ids).logits


class HFBertCheckpointed(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        return _AlwaysTraining(_tiny_bert())


class HFLlamaCheckpointed(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        return _AlwaysTraining(_tiny_llama())


class HFBertCheckpointedEval(ZooTask):
    """gradient_checkpointing_enable() on a model indexed in eval mode (HF then runs the layers plainly)."""

    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        model = _tiny_bert()
        model.gradient_checkpointing_enable()
        return model

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits


# -- in-place ops after traced layers --------------------------------------------------------------------

class VGGInplace(ZooTask):
    """VGG-style: ReLU(inplace=True) right after the first traced layer."""

    input_shape = (1, 7, 7)

    def make_model(self):
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3, stride=2),
                             nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU(inplace=True),
                             nn.Linear(8, 3))


class _InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc1 = nn.Linear(27, 27)
        self.fc = nn.Linear(27, 3)

    def forward(self, x):
        out = self.conv1(x)
        out += x  # in place on the first traced layer's output
        h = torch.relu(out)
        out = self.conv2(h)
        out += h  # ResNet's `out += identity`
        z = torch.nn.functional.avg_pool2d(out, 2, ceil_mode=True).flatten(1)
        z2 = self.fc1(z)
        z2 += torch.tanh(z)
        return self.fc(z2)


class InplaceResidual(ZooTask):
    input_shape = (1, 5, 5)

    def make_model(self):
        return _InplaceResidual()


# -- sparse embedding gradients --------------------------------------------------------------------------

class _SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4, sparse=True, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class SparseEmbedding(ZooTask):
    input_shape = (SEQ,)
    integer_inputs = 9
    adamw = False  # AdamW refuses sparse gradients (torch.optim.SparseAdam is what trains such a layer)

    def make_model(self):
        return _SparseEmbedding()


# -- refused with the cause named --------------------------------------------------------------------------

class _NoGradRegion(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 5)  # trainable, but run without gradients
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.encoder(x))
        return self.head(h)


class NoGradRegion(ZooTask):
    def make_model(self):
        return _NoGradRegion()


class _RandomInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.mix = _AlwaysDropout()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.mix(torch.tanh(self.fc1(x))))


class _AlwaysDropout(nn.Module):
    def forward(self, x):
        return torch.nn.functional.dropout(x, 0.5, training=True)


class RandomInEval(ZooTask):
    """F.dropout(training=True): random even in eval mode."""

    def make_model(self):
        return _RandomInEval()


class _StochasticDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.branch = nn.Linear(5, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        keep = (torch.rand(h.shape[0], 1, dtype=h.dtype) > 0.5).to(h.dtype)  # drop the branch per example
        return self.fc2(h + keep * self.branch(h))


class StochasticDepth(ZooTask):
    def make_model(self):
        return _StochasticDepth()


class QuantizedDynamic(ZooTask):
    """int8 dynamic quantisation (torch.ao.quantization.quantize_dynamic) of the Linear layers; its checkpoints
    are its state_dict as torch.save writes it (packed parameters)."""

    dtype = torch.float32

    def build_model(self):
        torch.manual_seed(self.seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)

    def encode(self, examples):
        return torch.tensor([e.x for e in examples], dtype=torch.float32)

    def save_zoo_checkpoint(self, model, directory, index: int):
        path = directory / f"quantized-{index}.pt"
        torch.save(model.state_dict(), path)
        return path


class _DetachedOnly(nn.Module):
    """The only trainable layer's output is detached before the (frozen) head: the loss does not depend on
    any traced parameter."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3).requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)).detach())


class DetachedOnly(ZooTask):
    def make_model(self):
        return _DetachedOnly()


# -- adapter-only checkpoints (PEFT LoRA over a frozen base from the model factory) -------------------------

class LoRAAdapter(ZooTask):
    """A tiny BERT (random weights from a config, seeded: the frozen base) with LoRA on the attention's query
    and value projections. Its checkpoints are PEFT `save_pretrained` folders holding the LoRA weights only
    (adapter_model.safetensors + adapter_config.json); the traced parameters are the LoRA ones."""

    input_shape = (SEQ,)
    integer_inputs = 9

    def make_model(self):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
        return get_peft_model(_tiny_bert(), config)

    def forward(self, model, inputs):
        return model(input_ids=inputs).logits

    def save_zoo_checkpoint(self, model, directory, index: int):
        """save_pretrained: the adapter's weights only."""
        path = directory / f"adapter-{index}"
        model.save_pretrained(path)
        return path


def make_zoo_checkpoints(task, directory, count: int = 2):
    """`tests.conftest.make_checkpoints`, or for tasks with `save_zoo_checkpoint` (adapter-only checkpoints)
    the same seeded perturbation of the trainable parameters only, saved by the task."""
    from indexer.sketch.embedding import Checkpoint
    from tests.conftest import make_checkpoints

    if not hasattr(task, "save_zoo_checkpoint"):
        return make_checkpoints(task, directory, count=count)
    out = []
    for i in range(count):
        model = task.build_model()
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        out.append(Checkpoint(task.save_zoo_checkpoint(model, directory, i), 0.5 / (i + 1)))
    return out


#: zoo entries that must give exact answers (name -> task class)
EXACT = {t.__name__: t for t in (
    MLP, CNN, TiedLMHead, FunctionalTie, CalledTwice, FrozenEncoder, WeightNorm, SeqFirstLinear,
    BroadcastPositions, FoldedBatch, LSTM, GRU, MultiheadAttention, TransformerBatchFirst, TransformerSeqFirst,
    BatchStatsNorm, Regression, MultiOutputRegression, MultiLabel, BFloat16, EmbeddingMaxNorm, TupleInputs, CausalLM,
    # issue 22: activation checkpointing, in-place ops, sparse embedding gradients, adapter-only checkpoints
    CheckpointReentrant, CheckpointNonReentrant, CheckpointPartial, CheckpointSequential,
    CheckpointSequentialReentrant, SwinCheckpointed, HFBertCheckpointed, HFLlamaCheckpointed, HFBertCheckpointedEval,
    VGGInplace, InplaceResidual, SparseEmbedding, LoRAAdapter)}
#: zoo entries that must be refused in one line (name -> (task class, words the message must contain))
REFUSED = {"BatchStatsNorm1d": (BatchStatsNorm1d, ("one example alone",)),
           "SqueezeOutput": (SqueezeOutput, ("squeeze",)),
           "NoGradRegion": (NoGradRegion, ("layer 'encoder'", "torch.no_grad() region", "'encoder.weight'")),
           "RandomInEval": (RandomInEval, ("random in eval mode", "module 'mix'")),
           "StochasticDepth": (StochasticDepth, ("random in eval mode", "_StochasticDepth")),
           "DetachedOnly": (DetachedOnly, ("exactly zero", "does not depend on the traced parameters")),
           "QuantizedDynamic": (QuantizedDynamic, ("'0', '2'", "quantised", "no gradient"))}
