"""Optimizers built from the ``optimizer`` config section, with DeepSpeed's names and semantics.

``"Adam"`` runs in AdamW mode (decoupled weight decay, ``torch.optim.AdamW``) unless
``adam_w_mode: false``, which gives L2-style ``torch.optim.Adam``; both default to
``weight_decay: 0`` as DeepSpeed's fused Adam does (torch's AdamW would default to 0.01).
``"Lamb"`` and ``"Lion"`` are implemented here; any other ``torch.optim`` class is accepted by
name. Keys DeepSpeed's own kernels take but PyTorch's do not (``torch_adam``,
``set_grad_none``, ``fp32_optimizer_states``) are ignored with a one-time warning.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.utils.logging import warn_once

__all__ = ["Lamb", "Lion", "FusedAdam", "DeepSpeedCPUAdam", "build_optimizer", "is_supported_for_zero",
           "optimizer_names"]

_NOT_IMPLEMENTED = {
    "onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb",
    "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD",
}
# Closure-driven optimizers cannot be stepped by the engine, which calls step() with no closure.
_TORCH_REJECTED = {"LBFGS": "it needs a closure that re-evaluates the loss at every step"}
# DeepSpeed-kernel keys that have no meaning on PyTorch's optimizers -> why they are ignored.
_IGNORED = {
    "set_grad_none": "PyTorch optimizers' zero_grad sets gradients to None by default",
    "fp32_optimizer_states": "optimizer states take the dtype of the (fp32 master) parameters",
}
_ADAM_EXTRAS = ["adam_w_mode", "torch_adam", "bias_correction", *_IGNORED]


def _foreach_buckets(params: list[torch.Tensor], foreach: bool | None) -> list[list[int]]:
    """Indices of ``params`` grouped so each group can go through one ``torch._foreach`` call.

    Grouped by (device, dtype, tensor subclass) as foreach kernels need; with ``foreach=False``
    every tensor is its own group.
    """
    if foreach is False:
        return [[i] for i in range(len(params))]
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype, type(p)), []).append(i)
    return list(buckets.values())


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class _FusedStateOptimizer(torch.optim.Optimizer):
    """Collect (param, grad, state) lists per param group; subclasses apply the update."""

    _state_keys: tuple[str, ...] = ()

    def _gather(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[dict]]:
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            state = self.state[p]
            if not state:
                # step lives on the CPU, as in torch's optimizers: reading it never syncs a device.
                state["step"] = torch.tensor(0.0)
                for key in self._state_keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        Returns:
            the closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._gather(group)
            if params:
                self._update(group, params, grads, states)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                states: list[dict]) -> None:
        raise NotImplementedError


def _check_common(lr: Any, betas: Any, weight_decay: Any) -> None:
    if not 0.0 <= _as_float(lr):
        raise ValueError(f"lr must be >= 0, got {lr}.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}.")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")


class Lamb(_FusedStateOptimizer):
    """LAMB (You et al. 2019): Adam's update scaled per tensor by a trust ratio.

    Per parameter tensor w with gradient g at step t:
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; with ``bias_correction`` m^ = m/(1-b1^t) and
    v^ = v/(1-b2^t) (else m^ = m, v^ = v); u = m^ / (sqrt(v^) + eps) + weight_decay * w
    (``eps_inside_sqrt``: m^ / sqrt(v^ + eps)); r = clamp(||w|| / ||u||, min_coeff, max_coeff),
    or 1 when either norm is 0; w -= lr * r * u.

    The trust ratio is computed with tensor ops (no host sync), so sharded DTensor parameters
    get the norm of the whole tensor.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: (b1, b2) moment decay rates.
        eps: added to the denominator.
        weight_decay: decoupled weight decay added to the update before the trust ratio.
        bias_correction: divide the moments by (1 - b^t).
        max_coeff: upper clamp of the trust ratio.
        min_coeff: lower clamp of the trust ratio.
        eps_inside_sqrt: use sqrt(v + eps) instead of sqrt(v) + eps.
        foreach: use ``torch._foreach`` kernels (``None``/``True``) or a per-tensor loop (``False``).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, bias_correction: bool = True,
                 max_coeff: float = 10.0, min_coeff: float = 0.01, eps_inside_sqrt: bool = False,
                 foreach: bool | None = None) -> None:
        _check_common(lr, betas, weight_decay)
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not 0.0 < min_coeff <= max_coeff:
            raise ValueError(f"min_coeff and max_coeff need 0 < min_coeff <= max_coeff, got "
                             f"min_coeff={min_coeff}, max_coeff={max_coeff}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff,
                        eps_inside_sqrt=eps_inside_sqrt, foreach=foreach)
        super().__init__(params, defaults)
        self._lamb_coeffs: list[torch.Tensor] = []

    def step(self, closure: Any = None) -> Any:
        """One LAMB update (see the class docstring); ``closure`` re-evaluates the loss if given.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        Returns:
            the closure's loss, or ``None``.
        """
        self._lamb_coeffs = []
        return super().step(closure)

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                states: list[dict]) -> None:
        b1, b2 = (_as_float(b) for b in group["betas"])
        lr, eps, wd = _as_float(group["lr"]), group["eps"], group["weight_decay"]
        for idx in _foreach_buckets(params, group["foreach"]):
            ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
            ms = [states[i]["exp_avg"] for i in idx]
            vs = [states[i]["exp_avg_sq"] for i in idx]
            torch._foreach_lerp_(ms, gs, 1.0 - b1)  # m = b1*m + (1-b1)*g
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
            if group["bias_correction"]:
                steps = [_as_float(states[i]["step"]) for i in idx]
                bc1 = [1.0 - b1 ** t for t in steps]
                bc2 = [1.0 - b2 ** t for t in steps]
            else:
                bc1 = bc2 = [1.0] * len(idx)
            denom = torch._foreach_div(vs, bc2)
            if group["eps_inside_sqrt"]:
                torch._foreach_add_(denom, eps)
                torch._foreach_sqrt_(denom)
            else:
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
            updates = torch._foreach_div(ms, bc1)
            torch._foreach_div_(updates, denom)
            del denom
            if wd != 0.0:
                torch._foreach_add_(updates, ps, alpha=wd)
            w_norms = torch._foreach_norm(ps)
            u_norms = torch._foreach_norm(updates)
            for p, u, wn, un in zip(ps, updates, w_norms, u_norms):
                ratio = torch.where((wn > 0) & (un > 0),
                                    (wn / un).clamp(group["min_coeff"], group["max_coeff"]),
                                    torch.ones_like(wn))
                p.sub_(u * (ratio * lr).to(u.dtype))
                self._lamb_coeffs.append(ratio.detach())

    def get_lamb_coeffs(self) -> list[float]:
        """Trust ratios applied in the last step, one per updated tensor (syncs with the device)."""
        out = []
        for c in self._lamb_coeffs:
            full = c.full_tensor() if hasattr(c, "full_tensor") else c
            out.append(float(full.item()))
        return out


class Lion(_FusedStateOptimizer):
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, with decoupled weight decay.

    Per parameter tensor w with gradient g: c = b1*m + (1-b1)*g; w = w*(1 - lr*weight_decay);
    w -= lr * sign(c); m = b2*m + (1-b2)*g. Only one state tensor (m) per parameter.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (DeepSpeed's default 1e-3; Lion usually wants 3-10x less than AdamW).
        betas: (b1, b2): interpolation for the update and momentum decay.
        weight_decay: decoupled weight decay (typically 3-10x larger than AdamW's).
        foreach: use ``torch._foreach`` kernels (``None``/``True``) or a per-tensor loop (``False``).
    """

    _state_keys = ("exp_avg",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, foreach: bool | None = None) -> None:
        _check_common(lr, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                states: list[dict]) -> None:
        b1, b2 = (_as_float(b) for b in group["betas"])
        lr, wd = _as_float(group["lr"]), group["weight_decay"]
        for idx in _foreach_buckets(params, group["foreach"]):
            ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
            ms = [states[i]["exp_avg"] for i in idx]
            if wd != 0.0:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            direction = torch._foreach_lerp(ms, gs, 1.0 - b1)  # b1*m + (1-b1)*g
            torch._foreach_sign_(direction)
            torch._foreach_add_(ps, direction, alpha=-lr)
            torch._foreach_lerp_(ms, gs, 1.0 - b2)


# -- DeepSpeed's Adam classes (deepspeed.ops.adam) ------------------------------------------------------

def _torch_adam_args(name: str, bias_correction: bool, amsgrad: bool) -> None:
    if amsgrad:
        raise RuntimeError(f"{name} does not support the AMSGrad variant (as in DeepSpeed). Fix: drop amsgrad=True, "
                           "or use torch.optim.Adam(amsgrad=True)")
    if not bias_correction:
        raise ValueError(f"{name}(bias_correction=False) is not supported: it runs torch.optim's Adam, which always "
                         "applies bias correction. Fix: drop bias_correction=False, or use flexspeed's Lamb "
                         "(bias_correction=False is supported there)")


class FusedAdam(torch.optim.Adam):
    """``deepspeed.ops.adam.FusedAdam`` with DeepSpeed's constructor, on ``torch.optim.Adam``.

    ``adam_w_mode=True`` (the default) is AdamW's decoupled weight decay, ``False`` L2-style Adam.
    Runs torch's multi-tensor (foreach) Adam, on any device; ``zero_grad()`` sets gradients to
    ``None`` unless ``set_grad_none=False``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, set_grad_none: bool = True) -> None:
        _torch_adam_args(type(self).__name__, bias_correction, amsgrad)
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=bool(adam_w_mode))
        self.adam_w_mode = bool(adam_w_mode)
        self.set_grad_none = bool(set_grad_none)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Clear gradients: to ``None`` if ``set_grad_none`` (DeepSpeed's switch), else to zeros."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)


class DeepSpeedCPUAdam(torch.optim.Adam):
    """``deepspeed.ops.adam.DeepSpeedCPUAdam`` with DeepSpeed's constructor, on ``torch.optim.Adam``.

    ``adamw_mode=True`` (the default) is AdamW, ``False`` L2-style Adam. It works on parameters on
    any device (DeepSpeed's needs them on the CPU). Optimizer states take the parameters' dtype,
    which under flexspeed's engine is fp32 (its master weights): ``fp32_optimizer_states`` is
    honoured there; over 16-bit parameters ``fp32_optimizer_states=True`` is refused.
    """

    def __init__(self, model_params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adamw_mode: bool = True, fp32_optimizer_states: bool = True) -> None:
        _torch_adam_args(type(self).__name__, bias_correction, amsgrad)
        super().__init__(model_params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=bool(adamw_mode))
        self.adam_w_mode = bool(adamw_mode)
        self.fp32_optimizer_states = bool(fp32_optimizer_states)
        low = sorted({str(p.dtype) for g in self.param_groups for p in g["params"]
                      if p.dtype in (torch.float16, torch.bfloat16)})
        if self.fp32_optimizer_states and low:
            raise ValueError(f"DeepSpeedCPUAdam(fp32_optimizer_states=True) over {'/'.join(low)} parameters: torch's "
                             "Adam keeps states in the parameters' dtype. Fix: keep fp32 parameters (flexspeed's engine "
                             "does, computing in 16 bits under autocast), or pass fp32_optimizer_states=False")


# -- building from the config --------------------------------------------------------------------


def _torch_optimizers() -> dict[str, type]:
    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            out[name] = obj
    return out


_OURS: dict[str, type] = {"Adam": torch.optim.AdamW, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD,
                          "Adagrad": torch.optim.Adagrad, "Lamb": Lamb, "Lion": Lion}


def optimizer_names() -> list[str]:
    """Every optimizer name ``build_optimizer`` accepts: DeepSpeed's, then other torch.optim classes."""
    extra = sorted(n for n in _torch_optimizers() if n not in _OURS and n not in _TORCH_REJECTED)
    return list(_OURS) + extra


def _resolve(type_name: str) -> tuple[str, type]:
    """Map a config name (case-insensitive) to (canonical name, class)."""
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f"must be an optimizer name such as 'AdamW', got {type_name!r}.", key="optimizer.type")
    lowered = type_name.lower()
    if lowered in _NOT_IMPLEMENTED:
        raise ConfigError(f"{_NOT_IMPLEMENTED[lowered]} is not implemented in flexspeed (it needs DeepSpeed's "
                          f"custom kernels). Use 'Adam', 'AdamW' or 'Lamb' instead.", key="optimizer.type")
    for name, cls in list(_OURS.items()) + list(_torch_optimizers().items()):
        if name.lower() == lowered:
            if name in _TORCH_REJECTED:
                raise ConfigError(f"torch.optim.{name} cannot be driven by the engine: {_TORCH_REJECTED[name]}. "
                                  f"Use another optimizer.", key="optimizer.type")
            return name, cls
    raise ConfigError(f"unknown optimizer {type_name!r}.{did_you_mean(type_name, optimizer_names())} "
                      f"Supported: {list(_OURS)} or any torch.optim class by name (e.g. 'RMSprop').",
                      key="optimizer.type")


def _signature_defaults(cls: type) -> dict[str, Any]:
    """Constructor keyword -> default (``inspect.Parameter.empty`` if none), minus self/params."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _adam_mode(name: str, params: dict[str, Any]) -> type:
    """Pop DeepSpeed's Adam switches from ``params``; return torch.optim.AdamW or torch.optim.Adam."""
    adam_w_mode = params.pop("adam_w_mode", True)
    if not isinstance(adam_w_mode, bool):
        raise ConfigError(f"must be true or false, got {adam_w_mode!r}.", key="optimizer.params.adam_w_mode")
    if name == "AdamW" and not adam_w_mode:
        raise ConfigError("contradicts type 'AdamW' (decoupled weight decay). For L2-style Adam use "
                          "\"type\": \"Adam\" with \"adam_w_mode\": false.", key="optimizer.params.adam_w_mode")
    if params.pop("torch_adam", True) is False:
        warn_once("optimizer.params.torch_adam=false is ignored: flexspeed always runs torch.optim's "
                   "Adam/AdamW (set \"fused\": true for the fused kernel).")
    if params.pop("bias_correction", True) is not True:
        raise ConfigError("torch.optim's Adam always applies bias correction; remove bias_correction or "
                          "set it true (or use \"type\": \"Lamb\", which supports it).",
                          key="optimizer.params.bias_correction")
    params.setdefault("weight_decay", 0.0)  # DeepSpeed's default, not AdamW's 0.01
    return torch.optim.AdamW if adam_w_mode else torch.optim.Adam


def _check_values(name: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Reject unresolved "auto" and obvious type mismatches; lists -> tuples where a tuple is expected."""
    out = {}
    for key, value in params.items():
        where = f"optimizer.params.{key}"
        default = defaults.get(key, inspect.Parameter.empty)
        if isinstance(value, str) and value == "auto":
            raise ConfigError("is still \"auto\"; it must be resolved before the optimizer is built. Give a "
                              "value.", key=where)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name} needs true or false, got {value!r}. Fix: set it to true or false "
                              f"(default {str(default).lower()}).", key=where)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor))):
            raise ConfigError(f"{name} needs a number, got {value!r}. Fix: set it to a number (default "
                              f"{default}).", key=where)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def _key_from_error(message: str, accepted: Iterable[str]) -> str:
    """Best guess at which ``optimizer.params`` key a constructor's error message is about."""
    hits = [(m.start(), key) for key in accepted if (m := re.search(rf"\b{re.escape(key)}\b", message))]
    if hits:
        return f"optimizer.params.{min(hits)[1]}"
    for phrase, key in (("learning rate", "lr"), ("beta", "betas"), ("epsilon", "eps"), ("momentum", "momentum")):
        if phrase in message.lower():
            return f"optimizer.params.{key}"
    return "optimizer.params"


_FP32_MAX = 3.4028234663852886e38


def _check_numbers(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse non-finite and absurd numbers before torch sees them (it accepts ``lr=inf`` and
    2-tuples' worth of a 3-element ``betas``, and fails deep inside a later step)."""
    for key, value in kwargs.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                    math.isfinite(v) and abs(v) <= _FP32_MAX):
                raise ConfigError(f"{name} got {key}={value!r}: every number must be finite and within float32's "
                                  f"range (|x| <= 3.4e38), or the first step turns the weights into inf/NaN. Fix: "
                                  f"set optimizer.params.{key} to a usable value (e.g. lr 1e-4 to 1e-2).",
                                  key=f"optimizer.params.{key}")
    betas = kwargs.get("betas")
    if betas is not None and not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"{name} got betas={betas!r}: betas are exactly two numbers in [0, 1) (the decay rates of "
                          "the first and second moment). Fix: e.g. \"betas\": [0.9, 0.999].",
                          key="optimizer.params.betas")


def _construct(name: str, cls: type, groups: list[Any], kwargs: dict[str, Any],
               accepted: list[str]) -> torch.optim.Optimizer:
    _check_numbers(name, kwargs)
    try:
        return cls(groups, **kwargs)
    except RuntimeError as err:
        if not kwargs.get("fused") or "fused" not in str(err):
            raise
        warn_once(f"optimizer.params.fused=true is ignored: {err}. Running the unfused kernel.")
        return cls(groups, **{k: v for k, v in kwargs.items() if k != "fused"})
    except (TypeError, ValueError, KeyError, IndexError) as err:
        # KeyError/IndexError: torch indexes a malformed value, e.g. betas={} or betas=[]
        detail = str(err) if isinstance(err, (TypeError, ValueError)) else f"{type(err).__name__} {err}"
        key = _key_from_error(detail, accepted)
        if key == "optimizer.params" and isinstance(err, (KeyError, IndexError)):
            key = next((f"optimizer.params.{k}" for k, v in kwargs.items() if isinstance(v, (list, tuple, dict))
                        and k in accepted), key)
        raise ConfigError(f"{name} rejected {kwargs}: {detail}. Fix that value in optimizer.params.",
                          key=key) from err


def build_optimizer(type_name: str, params: Mapping[str, Any] | None,
                    model_parameters: Iterable[Any]) -> torch.optim.Optimizer:
    """Build the ``optimizer`` config section over ``model_parameters``.

    Args:
        type_name: ``optimizer.type``, case-insensitive: ``Adam`` (AdamW mode unless
            ``adam_w_mode: false``), ``AdamW``, ``SGD``, ``Adagrad``, ``Lamb``, ``Lion``, or any
            ``torch.optim`` class name.
        params: ``optimizer.params`` (``None`` means empty).
        model_parameters: tensors or param-group dicts, as torch optimizers accept.
    Returns:
        the optimizer.
    Raises:
        ConfigError: unknown or unimplemented type, unknown or invalid parameter, with the key.
        ValueError: ``model_parameters`` is empty.
    """
    name, cls = _resolve(type_name)
    params = dict(params or {})
    if "max_grad_norm" in params:
        raise ConfigError("is not an optimizer parameter in flexspeed (nor DeepSpeed); set the top-level "
                          "\"gradient_clipping\": <norm> instead.", key="optimizer.params.max_grad_norm")
    defaults = _signature_defaults(cls)
    accepted = list(defaults)
    if name in ("Adam", "AdamW"):
        accepted += [k for k in _ADAM_EXTRAS if k not in defaults]
    elif name in ("Lamb", "Lion"):
        accepted += list(_IGNORED)
    for key in params:
        if key not in accepted:
            raise ConfigError(f"{name} has no parameter {key!r}.{did_you_mean(key, accepted)} Accepted: "
                              f"{accepted}.", key=f"optimizer.params.{key}")
    for key, why in _IGNORED.items():
        if key in params:
            params.pop(key)
            warn_once(f"optimizer.params.{key} is ignored: {why}.")
    if name in ("Adam", "AdamW"):
        cls = _adam_mode(name, params)
        defaults = _signature_defaults(cls)
    kwargs = _check_values(name, params, defaults)
    groups = list(model_parameters)
    if not groups:
        raise ValueError("model_parameters is empty: pass model.parameters() (or param-group dicts) of a "
                         "model that has trainable parameters.")
    return _construct(name, cls, groups, kwargs, accepted)


def is_supported_for_zero(optimizer: Any) -> bool:
    """True for optimizers the sharded (ZeRO) paths can drive: torch.optim's own and flexspeed's.

    Those keep per-parameter state keyed by the parameter and update each tensor independently
    (Lamb's per-tensor norms are global under DTensor), so they work on sharded parameters.
    """
    if isinstance(optimizer, (Lamb, Lion, FusedAdam, DeepSpeedCPUAdam)):
        return True
    cls = type(optimizer)
    return (isinstance(optimizer, torch.optim.Optimizer) and cls.__module__.startswith("torch.optim")
            and cls.__name__ not in _TORCH_REJECTED and cls.__name__ != "SparseAdam")
