"""Held-out accuracy of a demo member's weights: the demo's example of a user eval hook.

``evaluate(state_dict, member_name)`` is self-contained on purpose: given only the tensors and
the member's name it finds the task, rebuilds the model from the tensor shapes, loads the
weights strictly and scores the task's held-out split. That is exactly what a user-supplied
fidelity hook has to do with a member reconstructed from a bundle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from unipack.demo.model import build_model, config_from_state_dict
from unipack.demo.tasks import task_for_member


@torch.no_grad()
def evaluate(state_dict: Mapping[str, torch.Tensor], member_name: str) -> dict[str, float]:
    """``{"accuracy": percent}`` of these weights on ``member_name``'s task, held-out split.

    Raises ``ValueError`` for an unknown member name, or weights whose head does not fit the task.
    """
    task = task_for_member(member_name)
    config = config_from_state_dict(dict(state_dict))
    if config.num_labels != task.num_labels:
        raise ValueError(
            f"{member_name}: classifier has {config.num_labels} outputs but the task has {task.num_labels} classes"
        )
    model = build_model(config)
    # Reconstructed members may come back in another float dtype (fp16, bf16, fp64): score in fp32.
    model.load_state_dict({name: t.to(torch.float32) for name, t in state_dict.items()}, strict=True)
    model.eval()
    x, y = task.data("test")
    correct = (model(x).argmax(dim=1) == y).sum().item()
    return {"accuracy": 100.0 * correct / len(y)}


def accuracy_of(weights: str | os.PathLike[str] | Mapping[str, torch.Tensor], member_name: str) -> float:
    """Held-out accuracy (percent) of a ``.safetensors`` file or a state dict."""
    if isinstance(weights, Mapping):
        state_dict = weights
    else:
        from safetensors.torch import load_file

        state_dict = load_file(os.fspath(weights))
    return evaluate(state_dict, member_name)["accuracy"]
