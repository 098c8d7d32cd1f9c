"""Mixed precision: the compute-dtype policy, DeepSpeed's dynamic loss scaler, and the
gradient post-processing every engine shares (unscale + overflow check + global-norm clip).

flexspeed keeps fp32 master weights and runs 16-bit compute under ``torch.autocast``, so
gradients are produced, accumulated and reduced in fp32 at every ZeRO stage (DeepSpeed's stage 0
accumulates bf16 gradients and its loss drifts). Sharded gradients (DTensors) are handled: the
overflow flag and the norm are reduced across the ranks that hold the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["NumericalError", "NonFiniteGuard", "PrecisionPolicy", "LossScaler", "unscale_and_check_", "global_grad_norm", "total_norm", "clip_grads_"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """What to compute in. ``mode`` is "fp32", "bf16" or "fp16"; master weights stay fp32."""

    mode: str = "fp32"
    device_type: str = "cpu"

    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.mode]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context: autocast to the compute dtype, or nothing for fp32."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)


class NumericalError(RuntimeError):
    """Training cannot continue: gradients stay non-finite (fp16 at its minimum loss scale, or too
    many non-finite fp32/bf16 steps in a row)."""


class NonFiniteGuard:
    """fp32/bf16: skip (or raise on) optimizer steps whose global gradient norm is inf/NaN.

    Config ``flexspeed_nonfinite`` (a flexspeed extension). The norm is already a device tensor,
    reduced over every shard, so every rank takes the same decision; reading it costs one host
    sync per optimizer step (none per micro-step), and none with ``action: "off"``. A non-finite
    loss makes the gradients non-finite, so the norm catches it too.
    """

    def __init__(self, action: str = "skip", max_consecutive_skips: int = 10) -> None:
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0

    def should_skip(self, norm: torch.Tensor | float, step: int, loss: torch.Tensor | None = None) -> bool:
        """Whether optimizer step ``step`` must be skipped; raises ``NumericalError`` per the policy."""
        if self.action == "off":
            return False
        if bool(torch.isfinite(torch.as_tensor(norm)).all()):
            self.consecutive = 0
            return False
        self.consecutive += 1
        loss_text = "" if loss is None else f", last loss {float(loss):g}"
        what = f"the global gradient norm is {float(norm):g} at optimizer step {step}{loss_text}"
        if self.action == "raise" or self.consecutive >= self.max_consecutive_skips:
            why = ("flexspeed_nonfinite.action is 'raise'" if self.action == "raise" else
                   f"{self.consecutive} steps in a row were non-finite "
                   f"(flexspeed_nonfinite.max_consecutive_skips={self.max_consecutive_skips})")
            raise NumericalError(f"{what}; {why}. Fix: check the data and the loss for inf/NaN, lower the learning "
                                 "rate or enable gradient_clipping; the weights are still those of the last finite "
                                 "step")
        import logging

        logging.getLogger("flexspeed").warning(
            "flexspeed: %s; step skipped (no optimizer or scheduler step; %d in a row, raising at %d) "
            "[flexspeed_nonfinite]", what, self.consecutive, self.max_consecutive_skips)
        return True


class LossScaler:
    """DeepSpeed's loss scaler semantics: static when ``loss_scale > 0``, else dynamic.

    Dynamic: start at ``2**initial_scale_power``; an overflow costs one unit of hysteresis and,
    once hysteresis is spent, halves the scale (not below ``min_loss_scale``); the scale doubles
    at the clean step after each ``loss_scale_window`` clean steps since the last overflow
    (DeepSpeed 0.19.8's count: with a window of 2 and no overflow, the third step runs doubled).
    With ``consecutive_hysteresis`` a clean step refills the hysteresis. DeepSpeed applies
    hysteresis only under ZeRO (stages 1-3); its stage-0 fp16 optimizer halves at every
    overflow, so the engines pass ``hysteresis=1`` at stage 0.
    """

    def __init__(self, *, loss_scale: float = 0.0, initial_scale_power: int = 16, loss_scale_window: int = 1000,
                 hysteresis: int = 2, consecutive_hysteresis: bool = False, min_loss_scale: float = 1.0,
                 scale_factor: float = 2.0, raise_error_at_min_scale: bool = True) -> None:
        self.dynamic = loss_scale == 0
        self.cur_scale = float(2 ** initial_scale_power) if self.dynamic else float(loss_scale)
        self.scale_window = loss_scale_window
        self.min_scale = min_loss_scale
        self.delayed_shift = hysteresis
        self.cur_hysteresis = hysteresis
        self.consecutive_hysteresis = consecutive_hysteresis
        self.scale_factor = scale_factor
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """Advance one optimizer step, given whether its gradients overflowed."""
        if self.dynamic:
            if overflow:
                if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                    if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                        raise NumericalError(
                            f"fp16 gradients overflowed with the loss scale already at its minimum "
                            f"({self.min_scale:g}, fp16.min_loss_scale) after {self.cur_iter} optimizer steps: they "
                            "are inf/NaN even without scaling, so skipping steps would never end (DeepSpeed: "
                            "'Current loss scale already at minimum - cannot decrease scale anymore'). Fix: check "
                            "the data and the loss for inf/NaN, lower the learning rate, or train in bf16")
                    self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                else:
                    self.cur_hysteresis -= 1
                self.last_overflow_iter = self.cur_iter
            else:
                if self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                # DeepSpeed 0.19's count: the steps since the last overflow, less the current one
                stable_interval = (self.cur_iter - self.last_overflow_iter) - 1
                if stable_interval > 0 and stable_interval % self.scale_window == 0:
                    if not self.consecutive_hysteresis:
                        self.cur_hysteresis = self.delayed_shift
                    self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("dynamic", "cur_scale", "scale_window", "min_scale", "delayed_shift",
                                              "cur_hysteresis", "consecutive_hysteresis", "scale_factor",
                                              "cur_iter", "last_overflow_iter")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The locally held part of a (possibly DTensor) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _grads(params: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    return (p.grad for p in params if p.grad is not None)


def unscale_and_check_(params: Iterable[torch.Tensor], inv_scale: float,
                       group: dist.ProcessGroup | None = None) -> bool:
    """Multiply gradients by ``inv_scale`` in place and report whether any is inf/NaN on any rank.

    ``group`` is the set of ranks whose gradients differ (the shard group for sharded gradients);
    the flag is max-reduced over it so every rank takes the same skip decision.
    """
    grads = [_local(g) for g in _grads(params)]
    device = grads[0].device if grads else torch.device("cpu")
    found_inf = torch.zeros(1, device=device)
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.device, g.dtype), []).append(g)
    inv = torch.full((1,), inv_scale, device=device)
    for (dev, _), group_grads in by_dtype.items():
        torch._amp_foreach_non_finite_check_and_unscale_(group_grads, found_inf.to(dev), inv.to(dev))
        # (the op writes into found_inf only when devices match; recheck when they differ)
        if dev != device:
            found_inf += float(any(not torch.isfinite(g).all() for g in group_grads))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
    return bool(found_inf.item() > 0)


def global_grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The L2 (or ``norm_type``) norm of all gradients as one vector, across shards.

    DTensor gradients (FSDP2) are reduced by DTensor itself; plain tensors are assumed replicated
    (DDP / ZeRO-1 all-reduce them) and need no communication.
    """
    return total_norm(list(_grads(params)), norm_type)


def total_norm(tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of ``tensors`` as one vector: DTensor shards reduced, plain tensors as they are."""
    grads = list(tensors)
    if not grads:
        return torch.zeros(())
    # DTensor shards and whole (replicated) tensors cannot share one foreach call (ZeRO-3 keeps
    # small parameters whole), nor can DTensors on different meshes (tensor parallelism under
    # ZeRO-2/3: 2-D (dp, tp) and 1-D dp): one norm per kind, then the norm of those norms.
    kinds: dict = {}
    for g in grads:
        kinds.setdefault(g.device_mesh if hasattr(g, "full_tensor") else None, []).append(g)
    parts = []
    for kind in kinds.values():
        if kind:
            norm = torch.nn.utils.get_total_norm(kind, norm_type=norm_type, foreach=True)
            parts.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if len(parts) == 1:
        return parts[0].float()
    return torch.nn.utils.get_total_norm([n.to(parts[0].device) for n in parts], norm_type=norm_type).float()


def clip_grads_(params: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; return the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if norm is None:
        norm = global_grad_norm(params)
    if max_norm > 0:
        # a non-finite norm leaves the gradients as they are; decided on the device (no host sync)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
        grads = [_local(p.grad) for p in params]
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_dev.setdefault(g.device, []).append(g)
        for dev, gs in by_dev.items():
            torch._foreach_mul_(gs, coef.to(dev))
    return norm
