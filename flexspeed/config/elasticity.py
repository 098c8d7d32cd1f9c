"""DeepSpeed's ``elasticity`` section: one global batch size that many world sizes can run.

The batch-size arithmetic follows the last DeepSpeed that shipped it (``deepspeed/elasticity/`` as of
0.19.6; 0.19.8 removed elastic training and refuses the section). Its outputs for a grid of configs
are recorded from that code in ``tests/compat/fixtures/elasticity.json`` and compared in
``tests/unit/test_elasticity.py``.

Version 0.1: candidate batch sizes are each micro-batch size, and their least common multiple,
scaled by the largest highly composite number that keeps them within ``max_train_batch_size``; the
candidate divisible by the most GPU counts in ``[min_gpus, max_gpus]`` wins (ties: the larger batch
with ``prefer_larger_batch``, else the smaller). Version 0.2 does this per node
(``num_gpus_per_node``) and, when the current world size is not one of the valid counts, picks the
largest batch that fits it instead. For a world size, the micro-batch is the largest listed size
dividing ``batch // world_size``, and ``gradient_accumulation_steps = batch // (micro * world_size)``.

So a job restarted on fewer or more ranks keeps ``train_batch_size``; with the dataloader position in
its checkpoint (global samples consumed) it also keeps the data order.
"""

from __future__ import annotations

import json
import math
import os
from functools import reduce

from pydantic import Field

from flexspeed.config.errors import ConfigError
from flexspeed.config.fields import Bool, Float, NonNegFloat, PosInt, Section

__all__ = ["ElasticityConfig", "HCN_LIST", "compute_elastic_config", "elastic_triad", "candidate_batch_sizes",
           "valid_gpus", "LATEST_VERSION"]

LATEST_VERSION = 0.2
ENV_VAR = "DEEPSPEED_ELASTICITY_CONFIG"  # the config the resource scheduler saw (DeepSpeed's variable)
# The 38 smallest highly composite numbers (enough for batch sizes up to ~720K), as DeepSpeed uses them.
HCN_LIST = [1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040, 7560, 10080, 15120,
            20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320, 221760, 277200, 332640, 498960, 554400,
            665280, 720720]


class ElasticityConfig(Section):
    """``"elasticity"``: choose the batch triad so that the job can run at many world sizes (DeepSpeed's keys)."""

    enabled: Bool = False
    """Compute train_batch_size, the micro-batch and accumulation from the keys below."""
    max_train_batch_size: PosInt = 2000
    """The largest acceptable global batch (required when enabled)."""
    micro_batch_sizes: list[PosInt] = Field(default_factory=lambda: [2, 4, 6], min_length=1)
    """Micro-batch sizes a rank may run (required when enabled)."""
    min_gpus: PosInt = 1
    """Fewest ranks the job must be able to run on."""
    max_gpus: PosInt = 10000
    """Most ranks the job must be able to run on."""
    min_time: NonNegFloat = 0
    """Minimum running time (minutes) a scheduler should give the job at one size (not used by the arithmetic)."""
    version: Float = LATEST_VERSION
    """Arithmetic version: 0.1 or 0.2 (node-aware)."""
    prefer_larger_batch: Bool = True
    """Between equally elastic batch sizes, take the larger."""
    ignore_non_elastic_batch_info: Bool = False
    """Allow train_batch_size / micro-batch / accumulation keys in the config (they are overridden)."""
    num_gpus_per_node: PosInt = 1
    """Ranks per node (version 0.2)."""
    model_parallel_size: PosInt = 1
    """Model-parallel degree (version 0.2); flexspeed's data-parallel engine supports 1."""


def _lcm(values: list[int]) -> int:
    return reduce(lambda a, b: a * b // math.gcd(a, b), values, 1)


def candidate_batch_sizes(bases: list[int], max_batch: int) -> list[int]:
    """Each base times the largest highly composite number keeping it within ``max_batch`` (bases above it dropped)."""
    out = set()
    for base in bases:
        if base > max_batch:
            continue
        if base == max_batch:
            out.add(base)
            continue
        limit = max_batch // base
        # the first HCN above the limit, one step back; none above it wraps to the last (DeepSpeed's argmax)
        first_above = next((i for i, h in enumerate(HCN_LIST) if h > limit), 0)
        out.add(HCN_LIST[first_above - 1] * base)
    return sorted(out)


def valid_gpus(batch: int, micro_batches: list[int], min_gpus: int, max_gpus: int) -> list[int]:
    """World sizes in ``[min_gpus, max_gpus]`` that run ``batch`` with one of the micro-batch sizes."""
    found = set()
    for micro in micro_batches:
        if batch % micro:
            continue
        most = batch // micro
        if min_gpus <= most <= max_gpus:
            found.add(most)
        for n in range(max(1, min_gpus), min(most // 2, max_gpus) + 1):
            if most % n == 0:
                found.add(n)
    return sorted(found)


def _best(candidates: list[int], micro_batches: list[int], min_gpus: int, max_gpus: int,
          prefer_larger: bool) -> tuple[int, list[int] | None]:
    best_count, best_gpus, best_batch = 0, None, min(micro_batches)
    for batch in candidates:
        gpus = valid_gpus(batch, micro_batches, min_gpus, max_gpus)
        better_tie = batch > best_batch if prefer_larger else batch < best_batch
        if len(gpus) > best_count or (len(gpus) == best_count and better_tie):
            best_count, best_gpus, best_batch = len(gpus), gpus, batch
    return best_batch, best_gpus


def _v01(micro_batches: list[int], max_batch: int, min_gpus: int | None, max_gpus: int | None,
         prefer_larger: bool) -> tuple[int, list[int] | None]:
    min_gpus = min_gpus or 1
    max_gpus = max_gpus or max_batch // min(micro_batches)
    if any(m > max_batch for m in micro_batches):
        raise ConfigError(f"micro_batch_sizes {micro_batches} has sizes above max_train_batch_size {max_batch}. "
                          "Fix: lower them or raise max_train_batch_size", key="elasticity.micro_batch_sizes")
    bases = list(micro_batches) + [_lcm(micro_batches)]
    return _best(candidate_batch_sizes(bases, max_batch), micro_batches, min_gpus, max_gpus, prefer_larger)


def _largest_micro(batch: int, dp_size: int, micro_batches: list[int], prefer_larger: bool = True) -> int | None:
    fits = [m for m in micro_batches if batch // dp_size % m == 0]
    if not fits:
        return None
    return max(fits) if prefer_larger else fits[0]


def _v02(e: ElasticityConfig, world_size: int) -> tuple[int, list[int], int | None]:
    if e.num_gpus_per_node % e.model_parallel_size:
        raise ConfigError(f"num_gpus_per_node {e.num_gpus_per_node} is not divisible by model_parallel_size "
                          f"{e.model_parallel_size} (elasticity version 0.2)", key="elasticity.num_gpus_per_node")
    per_node = e.num_gpus_per_node // e.model_parallel_size
    batch, nodes = _v01(e.micro_batch_sizes, int(e.max_train_batch_size / per_node),
                        int(e.min_gpus / e.num_gpus_per_node), int(e.max_gpus / e.num_gpus_per_node),
                        e.prefer_larger_batch)
    batch = int(batch) * per_node
    valid = [n * per_node for n in nodes or []]
    dp = world_size // e.model_parallel_size
    if dp in valid:
        return batch, valid, _largest_micro(batch, dp, e.micro_batch_sizes, e.prefer_larger_batch)
    # this world size is not among the elastic ones: the largest (or smallest) batch that fits it
    current = (world_size / e.num_gpus_per_node) * per_node
    sizes = [math.floor(e.max_train_batch_size / float(m * current)) * m * current for m in e.micro_batch_sizes]
    batch = max(sizes) if e.prefer_larger_batch else min(sizes)
    return batch, [int(current)], _largest_micro(batch, int(current), e.micro_batch_sizes, e.prefer_larger_batch)


def _check_section(e: ElasticityConfig, given: set[str]) -> None:
    for key in ("max_train_batch_size", "micro_batch_sizes"):
        if key not in given:
            raise ConfigError(f"is required when elasticity is enabled (DeepSpeed: 'Elasticity config missing "
                              f"{key}'). Fix: add it to the elasticity section", key=f"elasticity.{key}")
    if e.max_gpus < e.min_gpus:
        raise ConfigError(f"min_gpus {e.min_gpus} is greater than max_gpus {e.max_gpus}. Fix: swap them",
                          key="elasticity.min_gpus")
    if e.version > LATEST_VERSION or e.version not in (0.1, 0.2):
        raise ConfigError(f"version {e.version} is not an elasticity version; DeepSpeed's are 0.1 and 0.2. Fix: use "
                          "0.2 (the default)", key="elasticity.version")
    if e.model_parallel_size > 1:
        why = "version 0.1 does not support model parallelism" if e.version != 0.2 else \
            "flexspeed's data-parallel engine has no model parallelism"
        raise ConfigError(f"model_parallel_size {e.model_parallel_size}: {why}. Fix: set it to 1",
                          key="elasticity.model_parallel_size")


def _check_scheduler_env(e: ElasticityConfig) -> None:
    """``DEEPSPEED_ELASTICITY_CONFIG`` (set by a resource scheduler) must describe the same elastic job."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return
    try:
        seen = ElasticityConfig.model_validate({**json.loads(text), "enabled": True})
    except Exception as exc:  # noqa: BLE001 - a scheduler's malformed variable
        raise ConfigError(f"environment variable {ENV_VAR} is not a valid elasticity section ({exc})",
                          key=ENV_VAR) from None
    for key in ("max_train_batch_size", "micro_batch_sizes", "version"):
        if getattr(seen, key) != getattr(e, key):
            raise ConfigError(f"{key} is {getattr(e, key)!r} here but {getattr(seen, key)!r} in {ENV_VAR} (what the "
                              "resource scheduler saw). Fix: give both the same elasticity section",
                              key=f"elasticity.{key}")


def compute_elastic_config(section: dict | ElasticityConfig, world_size: int = 0) -> tuple:
    """DeepSpeed's ``compute_elastic_config`` for one ``elasticity`` section.

    Args:
        section: the section (a dict as in the JSON, or a validated ``ElasticityConfig``).
        world_size: the data-parallel size to run at; 0 = only the batch size and valid sizes.
    Returns:
        ``(train_batch_size, valid_world_sizes)``, plus the micro-batch when ``world_size > 0``.
    Raises:
        ConfigError: a disabled or incomplete section, or a world size the section cannot run.
    """
    given = set(section) if isinstance(section, dict) else set(section.model_fields_set)
    e = section if isinstance(section, ElasticityConfig) else ElasticityConfig.model_validate(section)
    if not e.enabled:
        raise ConfigError("is false: there is nothing to compute. Fix: set \"enabled\": true",
                          key="elasticity.enabled")
    _check_section(e, given)
    if e.version == 0.1:
        batch, gpus = _v01(e.micro_batch_sizes, e.max_train_batch_size, e.min_gpus, e.max_gpus,
                           e.prefer_larger_batch)
        micro = None
    else:
        if world_size <= 0:
            env = os.environ.get("WORLD_SIZE", "")
            if not env.isnumeric():
                raise ConfigError("version 0.2 needs the world size (WORLD_SIZE is not set)", key="elasticity")
            world_size = int(env)
        batch, gpus, micro = _v02(e, world_size)
    batch = int(batch)
    if world_size <= 0:
        return batch, gpus
    if not gpus or world_size not in gpus:
        raise ConfigError(f"world size {world_size} is not one this elastic job can run at: the batch size {batch} "
                          f"runs at {gpus or 'no world size'} (min_gpus {e.min_gpus}, max_gpus {e.max_gpus}, "
                          f"micro_batch_sizes {e.micro_batch_sizes}). Fix: launch one of those sizes, or widen "
                          "the elasticity section", key="elasticity")
    micro = _largest_micro(batch, world_size, sorted(set(e.micro_batch_sizes)))
    if micro is None:
        raise ConfigError(f"no micro-batch size in {e.micro_batch_sizes} divides {batch} // {world_size}. Fix: add a "
                          "divisor of it to micro_batch_sizes", key="elasticity.micro_batch_sizes")
    return batch, gpus, micro


def elastic_triad(section: ElasticityConfig, world_size: int, triad_given: set[str]) -> tuple[int, int, int]:
    """``(train_batch_size, micro, gradient_accumulation_steps)`` for ``world_size``, as DeepSpeed's config sets them."""
    if triad_given and not section.ignore_non_elastic_batch_info:
        raise ConfigError(f"the config sets {sorted(triad_given)} and enables elasticity, which takes control of "
                          "the batch triad; those keys would not be used. Fix: remove them, or set "
                          "\"ignore_non_elastic_batch_info\": true in the elasticity section",
                          key="elasticity.ignore_non_elastic_batch_info")
    _check_scheduler_env(section)
    batch, _, micro = compute_elastic_config(section, world_size)
    return batch, micro, batch // (micro * world_size)
