"""The models, data and helpers DeepSpeed's unit tests share (its ``tests/unit/simple_model.py``,
``tests/unit/common.py`` and ``tests/unit/checkpoint/common.py``), rewritten for the ports in
this folder. Only the parts the ports use; same names, same shapes, same scenarios.

Everything here imports ``flexspeed as deepspeed``: the ports run DeepSpeed's test bodies with
only that import changed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict

import torch
import torch.distributed as dist

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.pipe import LayerSpec, PipelineModule


def preferred_dtype() -> torch.dtype:
    """DeepSpeed's choice: fp16 where supported, else bf16, else fp32 (bf16 on a CPU)."""
    if get_accelerator().is_fp16_supported():
        return torch.float16
    if get_accelerator().is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def half_precision_section(config: dict, **fp16_extra) -> dict:
    """DeepSpeed's ``if is_bf16_supported(): bf16 elif is_fp16_supported(): fp16`` block."""
    if get_accelerator().is_bf16_supported():
        config["bf16"] = {"enabled": True}
    elif get_accelerator().is_fp16_supported():
        config["fp16"] = {"enabled": True, **fp16_extra}
    return config


class SimpleModel(torch.nn.Module):
    """``nlayers`` square Linear layers (the deeper ones mixing in earlier layers), cross-entropy loss."""

    def __init__(self, hidden_dim: int, empty_grad: bool = False, nlayers: int = 1) -> None:
        super().__init__()
        self.linears = torch.nn.ModuleList([torch.nn.Linear(hidden_dim, hidden_dim) for _ in range(nlayers)])
        if empty_grad:
            self.linear2 = torch.nn.Linear(hidden_dim, hidden_dim)
        self.cross_entropy_loss = torch.nn.CrossEntropyLoss()
        self.empty_grad = empty_grad

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(self.linears) == 1:
            x = self.linears[0](x)
        else:
            for i, layer in enumerate(self.linears):
                x = self.linears[i // 2](x) + layer(x)
        return self.cross_entropy_loss(x, y)


class SimpleFrozenModel(SimpleModel):
    """Two layers, the first frozen; ``custom_state_dict`` leaves out ``linears.0.weight``."""

    def __init__(self, hidden_dim: int, empty_grad: bool = False) -> None:
        super().__init__(hidden_dim, empty_grad=empty_grad, nlayers=2)
        self.linears[0].weight.requires_grad = False
        self.linears[0].bias.requires_grad = False

    def custom_state_dict(self, *args, **kwargs) -> OrderedDict:
        full = torch.nn.Module.state_dict(self, *args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if "linears.0.weight" not in k)


class LinearStackPipe(PipelineModule):
    """Input Linear, ``num_layers`` bias-free Linear layers each followed by an identity function,
    output Linear; cross-entropy loss (DeepSpeed's pipeline test model)."""

    def __init__(self, input_dim: int = 128, hidden_dim: int = 128, output_dim: int = 128, num_layers: int = 4,
                 **kwargs) -> None:
        self.input_dim, self.hidden_dim, self.output_dim, self.num_layers = input_dim, hidden_dim, output_dim, num_layers
        layers = [LayerSpec(torch.nn.Linear, input_dim, hidden_dim)]
        for _ in range(num_layers):
            layers.append(LayerSpec(torch.nn.Linear, hidden_dim, hidden_dim, bias=False))
            layers.append(_identity)
        layers.append(LayerSpec(torch.nn.Linear, hidden_dim, output_dim))
        super().__init__(layers=layers, loss_fn=torch.nn.CrossEntropyLoss(), **kwargs)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class HybridStateOptimizer(torch.optim.Optimizer):
    """Plain SGD whose per-parameter state holds both a Python int and a tensor step counter."""

    def __init__(self, params, lr: float = 0.11072018) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["integer_step"] = 0
                    state["tensor_step"] = torch.zeros(1, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])
                state["integer_step"] += 1
                state["tensor_step"] += 1
        return loss


def random_dataset(total_samples: int, hidden_dim: int, device, dtype: torch.dtype | None = None):
    dtype = dtype or preferred_dtype()
    data = torch.randn(total_samples, hidden_dim, device=device, dtype=dtype)
    labels = torch.empty(total_samples, dtype=torch.long, device=device).random_(hidden_dim)
    return torch.utils.data.TensorDataset(data, labels)


def random_dataloader(model, total_samples: int, hidden_dim: int, device, dtype: torch.dtype | None = None):
    dataset = random_dataset(total_samples, hidden_dim, device, dtype=dtype)
    return torch.utils.data.DataLoader(dataset, batch_size=model.train_micro_batch_size_per_gpu())


def sequence_dataloader(model, total_samples: int, hidden_dim: int, device, seq_len: int = 32, dtype=None):
    dtype = dtype or preferred_dtype()
    data = torch.randn(total_samples, seq_len, hidden_dim, device=device, dtype=dtype)
    labels = torch.empty(total_samples, dtype=torch.long, device=device).random_(hidden_dim)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, labels),
                                       batch_size=model.train_micro_batch_size_per_gpu())


def create_config_from_dict(tmpdir, config_dict: dict) -> str:
    path = os.path.join(str(tmpdir), "temp_config.json")
    with open(path, "w") as f:
        json.dump(config_dict, f)
    return path


def args_from_dict(tmpdir, config_dict: dict) -> argparse.Namespace:
    args = argparse.ArgumentParser().parse_args(args=[])
    args.deepspeed = True
    if dist.is_initialized():
        args.local_rank = dist.get_rank()
    args.deepspeed_config = create_config_from_dict(tmpdir, config_dict)
    return args


def reduce_boolean_flags(flag: bool, op=all) -> bool:
    """Every rank's ``flag`` combined with ``op`` (``all``/``any``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return op([flag])
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return op(flags)


def destroy_group() -> None:
    """End the one-process group ``initialize()`` started, so the next case starts clean."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["deepspeed", "preferred_dtype", "half_precision_section", "SimpleModel", "SimpleFrozenModel",
           "LinearStackPipe", "HybridStateOptimizer", "random_dataset", "random_dataloader", "sequence_dataloader",
           "create_config_from_dict", "args_from_dict", "reduce_boolean_flags", "destroy_group"]
