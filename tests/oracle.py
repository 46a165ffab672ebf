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
