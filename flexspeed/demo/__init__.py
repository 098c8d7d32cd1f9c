"""The ``flexspeed demo`` job: a GPT learns multi-digit addition on 2 processes, then answers.

- :mod:`flexspeed.demo.task`: the addition task, its held-out split, and the demo config;
- :mod:`flexspeed.demo.train`: the per-rank training script (DeepSpeed style);
- :mod:`flexspeed.demo.evaluate`: checkpoint -> ``init_inference`` -> greedy answers -> accuracy.

The command itself is :mod:`flexspeed.cli.demo`.
"""

from __future__ import annotations

__all__: list[str] = []
