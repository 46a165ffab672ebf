"""Brute-force TracIn: one torch.autograd.grad per example, in float64, summed over checkpoints.

The model is converted to float64 (whatever its own dtype), floating inputs and labels too, and the
gradient is taken w.r.t. every trainable parameter tensor (a tied tensor once: its gradient sums all uses).
"""
from __future__ import annotations

import torch

from indexer.checkpoints import load_checkpoint
from indexer.task import Task, move_inputs, take_rows


def per_example_gradients(task: Task, state: dict, inputs, labels, param_names=None) -> torch.Tensor:
    """[B, P] float64: each example's gradient alone, over the trainable parameters (or `param_names`)."""
    model = task.build_model()
    model.load_state_dict(state)
    model = model.double().eval()
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and (param_names is None or name in param_names)]
    rows = []
    for i in range(labels.shape[0]):
        x = move_inputs(take_rows(inputs, slice(i, i + 1)), "cpu", torch.float64)
        y = labels[i:i + 1]
        y = y.double() if y.is_floating_point() else y
        loss = task.loss(task.forward(model, x), y).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def tracin_matrix(task: Task, checkpoints, inputs_a, labels_a, inputs_b, labels_b, param_names=None):
    """sum_i lr_i * g_i(a) g_i(b)^T  [A, B] in float64."""
    total = None
    for ckpt in checkpoints:
        state, _ = load_checkpoint(ckpt.path)
        ga = per_example_gradients(task, state, inputs_a, labels_a, param_names)
        gb = per_example_gradients(task, state, inputs_b, labels_b, param_names)
        term = ckpt.lr * ga @ gb.T
        total = term if total is None else total + term
    return total


def label_review_bruteforce(task: Task, checkpoints, inputs, labels) -> dict:
    """Per example, in float64, one forward pass per example and checkpoint (the model converted to
    float64): loss [N, C]; margin [N, C] (class: logit of the label minus the largest other logit;
    multi-label: min_j (2 y_j - 1) z_j; None for regression); and at the last checkpoint the prediction,
    its probability and the given label's (class: softmax; multi-label: product of per-label sigmoid
    probabilities; None for regression), each written out element by element."""
    import math

    kind = task.kind
    n, count = labels.shape[0], len(checkpoints)
    per_position = kind == "class" and labels.dim() > 1  # a class per position: only the loss is reviewed
    loss = [[0.0] * count for _ in range(n)]
    margin = [[0.0] * count for _ in range(n)] if kind != "regression" and not per_position else None
    prediction, probability, label_probability = [None] * n, [None] * n, [None] * n
    for c, ckpt in enumerate(checkpoints):
        state, _ = load_checkpoint(ckpt.path)
        model = task.build_model()
        model.load_state_dict(state)
        model = model.double().eval()
        for i in range(n):
            x = move_inputs(take_rows(inputs, slice(i, i + 1)), "cpu", torch.float64)
            y = labels[i:i + 1]
            y = y.double() if y.is_floating_point() else y
            with torch.no_grad():
                out = task.forward(model, x)
                loss[i][c] = float(task.loss(out, y)[0])
            z = [float(v) for v in out.reshape(-1)]
            if per_position:
                continue
            if kind == "class":
                label = int(y[0])
                margin[i][c] = z[label] - max(v for j, v in enumerate(z) if j != label)
            elif kind == "multilabel":
                target = [float(v) for v in y.reshape(-1)]
                margin[i][c] = min((2 * t - 1) * v for t, v in zip(target, z))
            if c == count - 1:
                if kind == "class":
                    top = max(z)
                    exps = [math.exp(v - top) for v in z]
                    probs = [e / sum(exps) for e in exps]
                    best = max(range(len(z)), key=lambda j: (z[j], -j))
                    prediction[i], probability[i], label_probability[i] = best, probs[best], probs[int(y[0])]
                elif kind == "multilabel":
                    probs = [1 / (1 + math.exp(-v)) for v in z]
                    pred = [1.0 if p > 0.5 else 0.0 for p in probs]
                    target = [float(v) for v in y.reshape(-1)]
                    prediction[i] = pred
                    probability[i] = math.prod(p if t > 0.5 else 1 - p for p, t in zip(probs, pred))
                    label_probability[i] = math.prod(p if t > 0.5 else 1 - p for p, t in zip(probs, target))
                else:
                    prediction[i] = z
    return {"loss": loss, "margin": margin, "prediction": prediction, "probability": probability,
            "label_probability": label_probability}


def percentile_ranks_bruteforce(values) -> list[float]:
    """Each value's rank among all in 0..1 (1 = the largest; ties share their mean rank), by counting."""
    n = len(values)
    return [(sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) - 1) / 2) / (n - 1)
            for v in values]
