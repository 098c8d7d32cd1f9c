"""``deepspeed.utils.set_z3_leaf_modules``: modules whose parameters ZeRO-3 gathers all at once.

DeepSpeed fetches ZeRO-3 parameters module by module as hooks fire; a "leaf" module (an MoE layer, whose
experts run data-dependently) is fetched whole instead. flexspeed's ZeRO-3 (FSDP2) already gathers whole units:
every repeated block (``_no_split_modules`` / ``nn.ModuleList`` children) and the root with everything outside
them, so every module inside one unit is gathered at once. ``set_z3_leaf_modules`` checks that each leaf
module lies inside one unit of that layout and returns the matched modules, as DeepSpeed's does; a leaf that
would span units is refused. Nothing is stored on the model.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["set_z3_leaf_modules"]


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: list[type | str],
                        raise_if_not_found: bool = True) -> list[nn.Module]:
    """The modules of ``model`` whose class is one of ``leaf_module_classes`` (classes or class names).

    Raises:
        ValueError: none matches (with ``raise_if_not_found``), or a match contains a repeated block (its
            parameters would be gathered in several units, not at once).
    """
    from flexspeed.runtime.fsdp import find_blocks

    wanted = {c if isinstance(c, str) else c.__name__ for c in leaf_module_classes}
    matched = [m for m in model.modules() if type(m).__name__ in wanted]
    if not matched and raise_if_not_found:
        raise ValueError(f"set_z3_leaf_modules: no modules of type {sorted(wanted)} found in {type(model).__name__}")
    blocks = find_blocks(model)
    for leaf in matched:
        inner = [b for b in blocks if b is not leaf and any(b is m for m in leaf.modules())]
        if inner:
            raise ValueError(
                f"set_z3_leaf_modules: {type(leaf).__name__} contains {len(inner)} repeated block(s) that flexspeed's "
                "ZeRO-3 gathers one at a time, so its parameters would not be gathered at once. Fix: mark a smaller "
                "module (inside one decoder block) as the leaf")
    return matched
