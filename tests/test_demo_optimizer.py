"""The demos' optimizer option (issue 18): AdamW-trained checkpoints carry the Adam state that the
optimizer-aware formula reads; the default stays plain SGD; an unknown optimizer is refused."""
from __future__ import annotations

import pytest
import torch

from indexer.checkpoints import load_checkpoint
from indexer.config import load_config


def _saved(path):
    return torch.load(path, weights_only=True)


def test_train_digits_adamw_saves_adam_state(tmp_path):
    from indexer.demo.digits import train_digits

    config = train_digits(tmp_path, epochs=2, checkpoints=2, optimizer="adamw")
    checkpoints = load_config(config).checkpoints
    assert len(checkpoints) == 2
    payload = _saved(checkpoints[-1].path)
    assert payload["optimizer_class"] == "torch.optim.adamw.AdamW"
    state = payload["optimizer_state_dict"]["state"]
    assert state and all("exp_avg_sq" in s for s in state.values())
    assert payload["optimizer_param_names"] == [["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]]
    # the default lr for AdamW (0.01), x 0.93 after the first epoch: the lr in force at the second one
    assert load_checkpoint(checkpoints[-1].path)[1]["lr"] == pytest.approx(0.01 * 0.93, rel=1e-12)


def test_train_digits_default_is_plain_sgd(tmp_path):
    from indexer.demo.digits import train_digits

    config = train_digits(tmp_path, epochs=1, checkpoints=1)
    payload = _saved(load_config(config).checkpoints[0].path)
    assert payload["optimizer_class"] == "torch.optim.sgd.SGD" and payload["lr"] == pytest.approx(0.1)


def test_unknown_optimizer_is_refused(tmp_path):
    from indexer.demo.digits import train_digits
    from indexer.demo.fashion_mnist import FashionCNN, fit_sgd, train_fashion_mnist

    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_digits(tmp_path, epochs=1, optimizer="lion")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_fashion_mnist(tmp_path, epochs=1, optimizer="lion")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit_sgd(FashionCNN(), torch.nn.functional.cross_entropy, torch.zeros(2, 1, 28, 28), torch.zeros(2).long(),
                epochs=1, lr=0.1, final_lr=0.01, batch_size=2, seed=0, optimizer="lion")
