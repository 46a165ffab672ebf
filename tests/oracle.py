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


def step_weights_bruteforce(optimizer_state: dict, names_by_group: list[list[str]], shapes: dict,
                            lr_in_force: float | None = None) -> dict:
    """w per parameter name (float64 tensors of the parameter's shape), computed element by element from a
    raw `optimizer.state_dict()` (an independent implementation of the formulas of indexer.optimizer.step):

        SGD (momentum / dampening / nesterov keys, no second moment)   w = lr_g
        Adam/AdamW ("betas" + "amsgrad")    w = lr_g / (sqrt(v / (1 - beta2^step)) + eps), v = exp_avg_sq
                                            (max_exp_avg_sq with amsgrad)
        RMSprop ("alpha" + "centered")      w = lr_g / (sqrt(square_avg [- grad_avg^2]) + eps)
        Adagrad ("lr_decay")                w = lr_g / (1 + (step - 1) lr_decay) / (sqrt(sum) + eps)

    Coordinates whose second moment is 0 take the largest weight / lr_g of the same tensor among the others
    (times lr_g). `lr_in_force` rescales the groups so that group 0's lr is it (ratios kept)."""
    import math

    groups = optimizer_state["param_groups"]
    state = optimizer_state["state"]
    first = float(groups[0]["lr"])
    out = {}
    number = 0
    for group, names in zip(groups, names_by_group):
        if lr_in_force is None:
            lr = float(group["lr"])
        elif first == 0:  # the schedule's end: the saved lrs are all 0, the lr in force is the logged one
            lr = lr_in_force
        else:
            lr = lr_in_force * (float(group["lr"]) / first)
        for name in names:
            st = state.get(number, {})
            number += 1
            shape = shapes[name]
            count = math.prod(shape) if shape else 1
            if "betas" in group:
                v = st["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"].double().reshape(-1).tolist()
                correction = 1 - float(group["betas"][1]) ** float(st["step"])
                gammas = [None if x == 0 else 1.0 / (math.sqrt(x / correction) + float(group["eps"])) for x in v]
            elif "alpha" in group:
                v = st["square_avg"].double().reshape(-1).tolist()
                if group.get("centered"):
                    mean = st["grad_avg"].double().reshape(-1).tolist()
                    v = [max(a - b * b, 0.0) for a, b in zip(v, mean)]
                gammas = [None if x == 0 else 1.0 / (math.sqrt(x) + float(group["eps"])) for x in v]
            elif "lr_decay" in group:
                v = st["sum"].double().reshape(-1).tolist()
                decay = 1 + (float(st["step"]) - 1) * float(group["lr_decay"])
                gammas = [None if x == 0 else 1.0 / ((math.sqrt(x) + float(group["eps"])) * decay) for x in v]
            else:
                gammas = [1.0] * count
            top = max(g for g in gammas if g is not None)
            values = [lr * (top if g is None else g) for g in gammas]
            out[name] = torch.tensor(values, dtype=torch.float64).reshape(shape)
    return out


def weighted_tracin_matrix(task: Task, checkpoints, weights: list[dict], inputs_a, labels_a, inputs_b, labels_b):
    """sum_i sum_p g_i,p(a) (.) w_i,p (.) g_i,p(b) [A, B] in float64: TracIn of the step the optimizer took,
    `weights[i]` = {parameter name: w} (e.g. from step_weights_bruteforce) over the traced parameters."""
    total = None
    for ckpt, w in zip(checkpoints, weights):
        state, _ = load_checkpoint(ckpt.path)
        names = list(w)
        model = task.build_model()
        order = [n for n, p in model.named_parameters() if n in w]
        ga = per_example_gradients(task, state, inputs_a, labels_a, set(names))
        gb = per_example_gradients(task, state, inputs_b, labels_b, set(names))
        flat_w = torch.cat([w[n].reshape(-1).double() if isinstance(w[n], torch.Tensor)
                            else torch.full((dict(model.named_parameters())[n].numel(),), float(w[n]),
                                            dtype=torch.float64) for n in order])
        term = (ga * flat_w) @ gb.T
        total = term if total is None else total + term
    return total
