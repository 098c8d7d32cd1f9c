"""Per-module FLOPs, parameters and latency of one forward pass (the ``flops_profiler`` config).

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (counted per aten op and
attributed to the module that ran it; ops it has no formula for, e.g. some fused attention
kernels, count as zero). Latency comes from forward pre/post hooks on every module, with a
device synchronisation on CUDA so the clock measures the kernels, not their launch.

Two ways in:

- ``profile_forward(model, *args, **kwargs)`` profiles one call and returns a
  :class:`ForwardProfile` (``print(profile.table())``);
- the training engine profiles the first micro-batch of step ``flops_profiler.profile_step``
  on rank 0 and prints the report (or appends it to ``output_file``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ModuleStats", "ForwardProfile", "ForwardProfiler", "profile_forward", "format_count"]


def format_count(value: float, unit: str = "") -> str:
    """``1234567 -> "1.23 M"``; used for parameters, FLOPs and FLOP/s."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


@dataclass
class ModuleStats:
    """One module's share of a forward pass."""

    name: str
    """Fully qualified name ("" is the root module)."""
    kind: str
    """The module's class name."""
    depth: int
    """0 for the root, 1 for its children, ..."""
    params: int
    """Parameters of the module and its submodules (global sizes, also when sharded)."""
    flops: int
    """Forward FLOPs of the module and its submodules."""
    latency_s: float
    """Wall time of the module's forward, summed over its calls."""


@dataclass
class ForwardProfile:
    """The result of profiling one forward pass."""

    modules: list[ModuleStats] = field(default_factory=list)
    total_flops: int = 0
    latency_s: float = 0.0
    recompute_fwd_factor: float = 0.0

    @property
    def total_params(self) -> int:
        return self.modules[0].params if self.modules else 0

    def train_flops(self) -> float:
        """Estimated FLOPs of forward + backward (backward ~ 2x forward) plus recomputation."""
        return self.total_flops * (3.0 + self.recompute_fwd_factor)

    def table(self, module_depth: int = -1, top_modules: int = 1, detailed: bool = True,
              step: int | None = None, iter_latency_s: float | None = None) -> str:
        """The report as text: a summary, the top modules per depth, and (``detailed``) the tree.

        Args:
            module_depth: deepest level of the tree shown (-1: all levels).
            top_modules: how many modules to list per depth, by FLOPs.
            detailed: include the per-module tree.
            step: the training step profiled, for the heading.
            iter_latency_s: wall time of the whole training step, when known.
        """
        lat = max(self.latency_s, 1e-12)
        lines = ["-" * 30 + " flexspeed flops profiler " + "-" * 30]
        if step is not None:
            lines.append(f"{'profiled step:':<45} {step}")
        rows = [
            ("parameters", format_count(self.total_params)),
            ("forward FLOPs", format_count(self.total_flops)),
            ("forward latency (under the profiler)", f"{self.latency_s * 1e3:.2f} ms"),
            ("forward FLOP/s", format_count(self.total_flops / lat, "FLOP/s")),
            ("fwd+bwd FLOPs (estimate: 3 x fwd" + (" + recompute)" if self.recompute_fwd_factor else ")"),
             format_count(self.train_flops())),
        ]
        if iter_latency_s is not None:
            rows.append(("step latency (fwd + bwd + optimizer)", f"{iter_latency_s * 1e3:.2f} ms"))
            rows.append(("training FLOP/s (estimate)",
                         format_count(self.train_flops() / max(iter_latency_s, 1e-12), "FLOP/s")))
        lines += [f"{label + ':':<45} {value}" for label, value in rows]
        shown = [m for m in self.modules if module_depth < 0 or m.depth <= module_depth]
        depths = sorted({m.depth for m in shown if m.depth > 0})
        if depths:
            lines.append(f"top {top_modules} module(s) by forward FLOPs at each depth:")
            for d in depths:
                best = sorted((m for m in shown if m.depth == d), key=lambda m: m.flops, reverse=True)[:top_modules]
                lines.append(f"  depth {d}: " + ", ".join(f"{m.name} ({format_count(m.flops)})" for m in best))
        if detailed:
            lines.append(f"{'module':<44} {'params':>10} {'fwd FLOPs':>11} {'% FLOPs':>8} {'latency':>10}")
            total = max(self.total_flops, 1)
            for m in shown:
                label = ("  " * m.depth + (m.name.rsplit(".", 1)[-1] if m.name else "(root)") + f" ({m.kind})")[:44]
                lines.append(f"{label:<44} {format_count(m.params):>10} {format_count(m.flops):>11} "
                             f"{100.0 * m.flops / total:>7.1f}% {m.latency_s * 1e3:>8.2f}ms")
        lines.append("-" * 86)
        return "\n".join(lines)


class ForwardProfiler:
    """Counts FLOPs and times every module of ``model`` between :meth:`start` and :meth:`stop`.

    Usable around code that is not a single call (the engine starts it before the forward and
    stops it after), or as a context manager.
    """

    def __init__(self, model: nn.Module, recompute_fwd_factor: float = 0.0) -> None:
        self.model = model
        self.recompute_fwd_factor = float(recompute_fwd_factor)
        self._names = {id(m): name for name, m in model.named_modules()}
        self._latency: dict[str, float] = {}
        self._open: dict[int, list[float]] = {}
        self._handles: list[Any] = []
        self._counter: Any = None
        self._t0 = 0.0
        self._sync = any(p.is_cuda for p in model.parameters())

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module: nn.Module, _args: Any) -> None:
        self._open.setdefault(id(module), []).append(self._now())

    def _post(self, module: nn.Module, _args: Any, _out: Any) -> None:
        starts = self._open.get(id(module))
        if starts:
            name = self._names.get(id(module), "")
            self._latency[name] = self._latency.get(name, 0.0) + self._now() - starts.pop()

    def start(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        self._counter = FlopCounterMode(display=False, depth=None)
        self._counter.__enter__()
        self._t0 = self._now()

    def stop(self) -> ForwardProfile:
        latency = self._now() - self._t0
        self._counter.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return self._collect(latency)

    def __enter__(self) -> ForwardProfiler:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.profile = self.stop()

    def _collect(self, latency: float) -> ForwardProfile:
        # FlopCounterMode names modules "<OutermostClass>.<fqn>", and the outermost module may be a
        # wrapper (DDP's "module." prefix); drop leading parts until the name is one of ours. A wrapper
        # and the module it wraps then share a name with equal counts, hence max() and not a sum.
        known = set(self._names.values())
        counts: dict[str, int] = {}
        for key, per_op in self._counter.get_flop_counts().items():
            if key == "Global":
                continue
            parts = key.split(".")[1:]
            while parts and ".".join(parts) not in known:
                parts = parts[1:]
            fqn = ".".join(parts)
            counts[fqn] = max(counts.get(fqn, 0), int(sum(per_op.values())))
        stats = []
        for name, module in self.model.named_modules():
            params = sum(p.numel() for p in module.parameters())
            stats.append(ModuleStats(name=name, kind=type(module).__name__, depth=name.count(".") + 1 if name else 0,
                                     params=params, flops=counts.get(name, 0),
                                     latency_s=self._latency.get(name, 0.0)))
        # containers that are never called themselves (ModuleList, ModuleDict) get their children's sums;
        # named_modules() lists parents first, so walk it backwards
        kids: dict[str, list[ModuleStats]] = {}
        for m in stats[1:]:
            kids.setdefault(m.name.rsplit(".", 1)[0] if "." in m.name else "", []).append(m)
        for m in reversed(stats):
            if m.name and m.name not in self._latency:
                m.flops = max(m.flops, sum(c.flops for c in kids.get(m.name, [])))
                m.latency_s = sum(c.latency_s for c in kids.get(m.name, []))
        return ForwardProfile(modules=stats, total_flops=int(self._counter.get_total_flops()), latency_s=latency,
                              recompute_fwd_factor=self.recompute_fwd_factor)


def profile_forward(model: nn.Module, *args: Any, recompute_fwd_factor: float = 0.0, **kwargs: Any) -> ForwardProfile:
    """Run ``model(*args, **kwargs)`` once under the profiler and return its :class:`ForwardProfile`.

    Example::

        prof = profile_forward(model, input_ids)
        print(prof.table(module_depth=2, top_modules=3))
    """
    prof = ForwardProfiler(model, recompute_fwd_factor=recompute_fwd_factor)
    prof.start()
    try:
        model(*args, **kwargs)
    finally:
        result = prof.stop()
    return result
