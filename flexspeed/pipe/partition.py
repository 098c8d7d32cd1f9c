"""How a list of layers is cut into contiguous pipeline stages.

Every partitioner returns *bounds*: a list of ``num_parts + 1`` increasing layer indices, stage
``s`` owning layers ``bounds[s]:bounds[s + 1]``. Each stage gets at least one layer.

- ``uniform``: the same number of layers per stage (the first stages take one extra when the
  count does not divide).
- ``parameters``: balance the parameter counts (weights) so the heaviest stage is as light as
  possible; among equally heavy cuts, the one with the most even layer counts wins.
- ``type:<regex>``: balance the number of layers whose class name matches ``<regex>``
  (case-insensitive ``re.search``), e.g. ``type:Block`` or ``type:^Transformer``.

The functions are pure (no process group), so they are cheap to unit-test and to call from
``PipelineModule.partition_report()`` on any rank.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["partition_uniform", "partition_balanced", "partition_by_type", "partition_layers", "PARTITION_METHODS"]

PARTITION_METHODS = ("uniform", "parameters", "type:<regex>")


def _check_counts(num_items: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"num_stages={num_parts} must be >= 1")
    if num_items < num_parts:
        raise ValueError(
            f"cannot cut {num_items} layers into {num_parts} pipeline stages: every stage needs at least one "
            f"layer. Fix: use at most {num_items} stages (num_stages x virtual_stages), or split the model "
            "into more layers")


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Bounds that give every part ``num_items // num_parts`` items, the first parts one more.

    Args:
        num_items: number of layers.
        num_parts: number of stages.
    Returns:
        ``num_parts + 1`` bounds.
    """
    _check_counts(num_items, num_parts)
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for part in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return bounds


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous cut of ``weights`` into ``num_parts`` non-empty parts minimising the heaviest part.

    Ties on the heaviest part are broken by the largest layer count per part, then by the
    earliest cut, so the result is deterministic. Exact dynamic programme, O(n^2 * parts); n is
    the number of layers (tens to hundreds), so this is instant.

    Args:
        weights: one non-negative weight per layer (e.g. its parameter count).
        num_parts: number of stages.
    Returns:
        ``num_parts + 1`` bounds.
    """
    n = len(weights)
    _check_counts(n, num_parts)
    if any(w < 0 for w in weights):
        raise ValueError(f"layer weights must be >= 0, got {list(weights)}")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = (float("inf"), float("inf"))
    # best[k][i]: (heaviest part, largest count) cutting the first i layers into k parts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):  # last part is layers j..i-1
                prev = best[k - 1][j]
                if prev == inf:
                    continue
                cand = max(prev, (prefix[i] - prefix[j], i - j))
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    bounds = [n]
    i = n
    for k in range(num_parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def partition_by_type(type_names: Sequence[str], pattern: str, num_parts: int) -> list[int]:
    """Balance the layers whose type name matches ``pattern`` (``re.search``, case-insensitive).

    Args:
        type_names: class name of each layer.
        pattern: the regular expression after ``type:``.
        num_parts: number of stages.
    Returns:
        ``num_parts + 1`` bounds.
    """
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"partition_method='type:{pattern}': {pattern!r} is not a valid regular expression "
                         f"({err})") from None
    weights = [1.0 if regex.search(name) else 0.0 for name in type_names]
    matches = int(sum(weights))
    if matches < num_parts:
        names = sorted(set(type_names))
        raise ValueError(
            f"partition_method='type:{pattern}' matches {matches} layer(s) but there are {num_parts} stages, so "
            f"some stage would hold none. Layer types present: {names}. Fix: choose a regex that matches at "
            "least one layer per stage (e.g. the transformer block class), or use 'parameters'")
    return partition_balanced(weights, num_parts)


def partition_layers(method: str, num_parts: int, *, param_counts: Sequence[int],
                     type_names: Sequence[str]) -> list[int]:
    """Dispatch on ``method`` ("uniform", "parameters" or "type:<regex>").

    Args:
        method: the ``partition_method`` of ``PipelineModule``.
        num_parts: number of stages (pipeline stages x virtual stages).
        param_counts: trainable parameter count of each layer.
        type_names: class name of each layer.
    Returns:
        ``num_parts + 1`` bounds.
    """
    if len(param_counts) != len(type_names):
        raise AssertionError("one parameter count and one type name per layer")
    lowered = method.lower()
    if lowered == "uniform":
        return partition_uniform(len(param_counts), num_parts)
    if lowered == "parameters":
        return partition_balanced(param_counts, num_parts)
    if lowered.startswith("type:"):
        return partition_by_type(type_names, method[len("type:"):], num_parts)
    raise ValueError(f"partition_method={method!r} is not one of {', '.join(map(repr, PARTITION_METHODS))}. "
                     "Fix: pass partition_method='parameters' (the default), 'uniform', or 'type:<regex>' such as "
                     "'type:Block'")
