"""Offloaded high-throughput generation: FlexLLMGen's placement policy and block schedule.

``flexspeed.init_inference(model, offload={...})`` (or ``offload=OffloadPolicy(...)``) places
weights, KV cache and activations on the compute device, host memory and disk by percentages,
and generates with a block schedule that reads the next layer while the current one computes.
Modules: ``policy`` (the knobs), ``arch`` (decoder families, per-layer forward), ``files``
(safetensors headers, page-cache maps, O_DIRECT), ``store`` (tiered weights), ``cache`` (tiered
KV cache), ``schedule`` (the block schedule), ``runner`` (what the engine builds), ``chooser``
(machine probe, cost model, policy search). See ``docs/offload.md``.

Only the policy is imported eagerly (the config module needs it); the rest loads on first use.
"""

from __future__ import annotations

from typing import Any

from flexspeed.inference.offload.policy import OffloadPolicy

__all__ = ["OffloadPolicy", "OffloadRunner", "OffloadedLM", "build_offload_runner", "get_offload_runner",
           "choose_policy", "probe_machine", "MachineProfile"]

_LAZY = {
    "OffloadRunner": "runner", "OffloadedLM": "runner", "build_offload_runner": "runner",
    "get_offload_runner": "runner", "choose_policy": "chooser", "probe_machine": "chooser",
    "MachineProfile": "chooser",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"flexspeed.inference.offload.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flexspeed.inference.offload' has no attribute {name!r}")
