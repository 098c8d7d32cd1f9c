"""Inference: ``init_inference`` and the pieces it composes.

``flexspeed.init_inference(model, config=None, **kwargs)`` returns an
:class:`~flexspeed.inference.engine.InferenceEngine`. Submodules: ``config`` (the typed config
and how sources merge), ``tp`` (automatic tensor parallelism), ``loading`` (checkpoints sliced
per rank), ``engine``, ``families`` (the model-family registry), ``runners`` (the decode runner
and its selection), ``hf_generate`` (HF's generate loop over a runner); and, from their own
owners, ``generation``, ``kernels``, ``quant``.
Everything heavier than the config is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexspeed.inference.config import InferenceConfig, InferenceTPConfig, resolve_inference_config

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from flexspeed.inference.engine import InferenceEngine

__all__ = ["init_inference", "InferenceEngine", "InferenceConfig", "InferenceTPConfig", "DeepSpeedTPConfig"]

DeepSpeedTPConfig = InferenceTPConfig  # the name DeepSpeed users import


def init_inference(model: nn.Module, config: Any = None, **kwargs: Any) -> InferenceEngine:
    """Prepare ``model`` for inference, as ``deepspeed.init_inference`` does.

    Args:
        model: a ``torch.nn.Module`` (a plain PyTorch or a Hugging Face model), with real
            weights or built on the meta device (then ``checkpoint`` must fill it).
        config: a dict, a JSON file path, an :class:`InferenceConfig`, or ``None``.
        **kwargs: config keys (``dtype``, ``tensor_parallel``, ``checkpoint``, ...). A key given
            both here and in ``config`` with a different value is an error.
    Returns:
        the :class:`~flexspeed.inference.engine.InferenceEngine`; its ``module`` is the model.
    Raises:
        ConfigError: the config is invalid; the message names the key, its value and the fix.
    """
    import time

    from flexspeed.inference.engine import InferenceEngine
    from flexspeed.utils.logging import ensure_handler

    log = ensure_handler()
    t0 = time.perf_counter()
    engine = InferenceEngine(model, resolve_inference_config(config, **kwargs))
    if engine.tp_rank == 0:
        log.info("init_inference: %s ready in %.1f s (%s)%s", type(model).__name__, time.perf_counter() - t0,
                 engine.describe(), engine.describe_loading())
    return engine


def __getattr__(name: str) -> Any:
    if name == "InferenceEngine":
        from flexspeed.inference.engine import InferenceEngine

        return InferenceEngine
    raise AttributeError(f"module 'flexspeed.inference' has no attribute {name!r}")
