"""``deepspeed.ops`` for flexspeed: the optimizer classes DeepSpeed scripts import (``ops.adam``).

flexspeed builds none of DeepSpeed's native kernels; these names run PyTorch's optimizers.
"""

from __future__ import annotations

from flexspeed.ops import adagrad, adam, lion

__all__ = ["adam", "adagrad", "lion"]
