"""Refuse a torch older than flexspeed supports, with a message that says how to fix it."""

from __future__ import annotations

import torch

from flexspeed import MIN_TORCH


def _parse(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_torch_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` if torch is older than ``MIN_TORCH``."""
    version = version or torch.__version__
    if _parse(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(
            f"flexspeed needs torch >= {need}, found torch {version}: FSDP2 on CPU/gloo computes wrong "
            f"gradients before {need}. Fix: pip install 'torch>={need}' (on this CPU machine: "
            f"pip install torch==2.13.0)."
        )


check_torch_version()
