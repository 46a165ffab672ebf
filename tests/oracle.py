"""Brute-force TracIn: one torch.autograd.grad per example, summed over checkpoints in float64."""
from __future__ import annotations

import torch

from indexer.checkpoints import load_checkpoint
from indexer.task import Task, take_rows


def per_example_gradients(task: Task, state: dict, inputs, labels, param_names=None) -> torch.Tensor:
    model = task.build_model()
    model.load_state_dict(state)
    model.eval()
    params = [p for name, p in model.named_parameters() if param_names is None or name in param_names]
    rows = []
    for i in range(labels.shape[0]):
        x = take_rows(inputs, slice(i, i + 1))
        loss = task.loss(task.forward(model, x), labels[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def tracin_matrix(task: Task, checkpoints, inputs_a, labels_a, inputs_b, labels_b, param_names=None):
    """sum_i lr_i * g_i(a) g_i(b)^T  [A, B]."""
    total = None
    for ckpt in checkpoints:
        state, _ = load_checkpoint(ckpt.path)
        ga = per_example_gradients(task, state, inputs_a, labels_a, param_names)
        gb = per_example_gradients(task, state, inputs_b, labels_b, param_names)
        term = ckpt.lr * ga @ gb.T
        total = term if total is None else total + term
    return total
