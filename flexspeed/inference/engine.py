"""The inference engine: a model prepared for inference by a fixed sequence of small steps.

Order (each step is one function, reading the config and the model, nothing else):

1. process group and TP group (a ``DeviceMesh`` with a ``"tp"`` dimension), device;
2. tensor-parallel plan and sharding (metadata only on a meta model);
3. checkpoint loading, each rank reading its own slices;
4. dtype;
5. placement on the device (or kept on the host, see ``keep_module_on_host``) and TP hooks (on the
   CPU their all-reduce runs through shared memory when the ranks share a host);
6. kernel injection, then weight quantization (both optional, by the sibling modules
   ``kernels.py`` and ``quant.py``), after which the TP hooks are re-attached to whatever
   modules now hold the planned names.

The module tree is kept throughout, so a later pass can stream weights layer by layer.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.inference.config import InferenceConfig
from flexspeed.inference.loading import LoadReport, load_checkpoint
from flexspeed.inference.tp import TensorParallelPlan, plan_tensor_parallel, shard_module

__all__ = ["InferenceEngine"]

_TP_KEY = "tensor_parallel.tp_size"


def _ensure_process_group(tp_size: int) -> None:
    """Start the default process group from the launcher's environment if none exists."""
    if dist.is_initialized():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < tp_size:
        raise ConfigError(
            f"tp_size={tp_size} needs {tp_size} processes but this process runs alone (WORLD_SIZE={world}); "
            f"launch it with `torchrun --nproc_per_node {tp_size} your_script.py` or set tp_size=1", key=_TP_KEY)
    try:
        from flexspeed.distributed import init_distributed  # type: ignore[attr-defined]
    except ImportError:
        init_distributed = None
    if init_distributed is not None:
        init_distributed()
    else:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _tp_group(config: InferenceConfig, device_type: str) -> tuple[Any, int, Any]:
    """(TP process group, rank in it, DeviceMesh or None) for ``config.tp_size``."""
    tp = config.tp_size
    if tp == 1:
        return None, 0, None
    _ensure_process_group(tp)
    world = dist.get_world_size()
    if tp > world:
        raise ConfigError(f"tp_size={tp} exceeds the {world} processes of this job; use tp_size <= {world} or "
                          f"launch {tp} processes", key=_TP_KEY)
    given = config.tensor_parallel.tp_group
    if given is not None:
        if dist.get_world_size(given) != tp:
            raise ConfigError(f"tp_group has {dist.get_world_size(given)} ranks but tp_size={tp}; make them "
                              "equal", key="tensor_parallel.tp_group")
        return given, dist.get_rank(given), None
    if world % tp:
        raise ConfigError(f"tp_size={tp} must divide the world size {world} (the remaining dimension is data "
                          "parallel); change tp_size or the number of processes", key=_TP_KEY)
    from flexspeed.distributed.parallel_dims import ParallelDims

    dims = ParallelDims.from_world(world, tp=tp, world_source="the process group",
                                   tp_source=f"{_TP_KEY}={tp}")
    mesh = dims.mesh("tp", device_type)
    return mesh.get_group(), mesh.get_local_rank(), mesh


def _pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _stream_from_host(model: nn.Module, device: torch.device) -> list[Any]:
    """Keep parameters in host memory; move each module's own weights to ``device`` for its call.

    Buffers move once (masks, rotary tables; quantized weights are buffers too, and small).
    """
    handles = []
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = b.to(device)
        params = [p for p in mod._parameters.values() if p is not None]
        if not params:
            continue
        host: dict[int, torch.Tensor] = {}

        def pre(_m: nn.Module, _args: tuple, params: list = params, host: dict = host) -> None:
            for p in params:
                host[id(p)] = p.data
                p.data = p.data.to(device, non_blocking=True)

        def post(_m: nn.Module, _args: tuple, _out: Any, params: list = params, host: dict = host) -> None:
            for p in params:
                p.data = host.pop(id(p))

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


class InferenceEngine(nn.Module):
    """A model prepared for inference; build it with ``flexspeed.init_inference``.

    Attributes:
        module: the prepared model (sharded, cast, possibly injected/quantized).
        device: where compute runs.
        plan: the tensor-parallel plan (``None`` for tp_size 1).
        tp_group: the TP process group (``None`` for tp_size 1).
        mesh: the DeviceMesh the TP group came from, if flexspeed built it.
        load_report: what checkpoint loading read, if a checkpoint was given.
    """

    def __init__(self, model: nn.Module, config: InferenceConfig) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}", key="model")
        self._config = config
        self.device = _pick_device()
        self.tp_group, self.tp_rank, self.mesh = _tp_group(config, self.device.type)
        self.plan: TensorParallelPlan | None = None
        self.load_report: LoadReport | None = None
        self._host_handles: list[Any] = []
        self._graphs: dict[Any, tuple[Any, Any, Any]] = {}
        self.offload: Any = None
        from flexspeed.inference.runners import select_runner

        if config.offload is not None:  # weights stay in the policy's tiers; the runner computes
            self.module = model.eval()
            self.runner_choice = select_runner(self.module, config, device=self.device)
            self.offload = self.runner_choice.runner
        else:
            self.module = self._prepare(model)
            self.runner_choice = select_runner(self.module, config, tp_group=self.tp_group)
        """The :class:`~flexspeed.inference.runners.RunnerChoice`: the decode runner ``generate`` drives, and why."""

    # -------------------------------------------------------------------------------- preparation

    def _prepare(self, model: nn.Module) -> nn.Module:
        cfg = self._config
        model.eval()
        if cfg.tp_size > 1:
            self.plan = plan_tensor_parallel(model, cfg.tp_size, cfg.injection_policy)
            shard_module(model, self.plan, self.tp_rank)
        if cfg.checkpoint is not None:
            self.load_report = load_checkpoint(model, cfg.checkpoint, base_dir=cfg.base_dir, plan=self.plan,
                                               rank=self.tp_rank, dtype=cfg.compute_dtype)
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ConfigError(f"parameters such as {meta[:3]} are on the meta device and no checkpoint fills "
                              "them; pass checkpoint=... or build the model with real weights", key="checkpoint")
        if cfg.compute_dtype is not None:
            model.to(cfg.compute_dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        on_host = self._config.keep_module_on_host and self.device.type != "cpu"
        if not on_host:
            model.to(self.device)  # before quantization, so low-bit layouts are chosen for the device
        if self.plan is not None:
            if self.device.type == "cpu":  # the ranks of one host sum through shared memory
                from flexspeed.inference.native_decoder import ShmAllReduce

                shm = ShmAllReduce.for_group(self.tp_group)
                self.plan.reduce = shm.reduce_ if shm is not None else None
            self.plan.attach(model, self.tp_group)
        model = self._inject_and_quantize(model)
        if self.plan is not None:
            self.plan.attach(model, self.tp_group)  # modules may have been replaced
        if on_host:  # after the passes that replace modules, so every final module is covered
            self._host_handles = _stream_from_host(model, self.device)
        return model

    def _inject_and_quantize(self, model: nn.Module) -> nn.Module:
        cfg = self._config
        if cfg.replace_with_kernel_inject:
            from flexspeed.inference.kernels import inject_kernels

            if not cfg.return_tuple:
                raise ConfigError("return_tuple=False is not supported with replace_with_kernel_inject=True: the "
                                  "fused blocks return exactly what the host model's own layer loop expects (a "
                                  "tensor in transformers 5 and the flexspeed GPT), so the model's forward and "
                                  "generate keep working; remove return_tuple or set it to true", key="return_tuple")
            model = inject_kernels(model, cfg.compute_dtype or _model_dtype(model), native=cfg.decode_path != "torch")
        bits = cfg.quantize_bits
        if bits is not None:
            from flexspeed.inference.quant import quantize_linears

            from flexspeed.inference.kernels import get_runner

            runner = get_runner(model)
            # an injected runner with the native decode kernel reads int4 in the plain order
            plain = runner is not None and runner.native_decode and runner.native_available()
            model = quantize_linears(model, num_bits=bits, group_size=cfg.quant.weight.group_size,
                                     int4_layout="plain" if plain else "auto")
        return model

    # -------------------------------------------------------------------------------- properties

    @property
    def runner(self):
        """The :class:`~flexspeed.inference.runners.DecodeRunner` this engine's ``generate`` drives.

        Chosen again if ``module`` was changed since in a way that makes the held runner stale
        (kernels injected into it, a shadowed block's modules replaced).
        """
        from flexspeed.inference.runners import remembered

        held = self.runner_choice.runner
        recorded = remembered(self.module) if self.offload is None else held
        if (recorded is not None and recorded is not held) or not getattr(held, "current", lambda: True)():
            from flexspeed.inference.runners import select_runner

            self.runner_choice = select_runner(self.module, self._config, tp_group=self.tp_group)
        return self.runner_choice.runner

    @property
    def config(self) -> InferenceConfig:
        """The validated config."""
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the configured one, or the model's)."""
        return self._config.compute_dtype or _model_dtype(self.module)

    @property
    def tp_size(self) -> int:
        """Tensor-parallel degree."""
        return self._config.tp_size

    @property
    def mp_world_size(self) -> int:
        """DeepSpeed's name for :attr:`tp_size`."""
        return self._config.tp_size

    # -------------------------------------------------------------------------------- running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on ``args``/``kwargs`` (moved to the engine's device); return its output."""
        if self.device.type != "cpu":
            args, kwargs = _to_device(args, self.device), _to_device(kwargs, self.device)
        if self.offload is not None:
            return self.offload.logits(*args, **kwargs)
        if self._config.enable_cuda_graph:
            return self._graph_call(args, kwargs)
        return self.module(*args, **kwargs)

    def _graph_call(self, args: tuple, kwargs: dict) -> Any:
        """Replay a CUDA graph captured for these input shapes (captured on first use)."""
        flat = list(args) + list(kwargs.values())
        key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in flat)
        if key not in self._graphs:
            static_args, static_kwargs = _clone(args), _clone(kwargs)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up allocations outside the graph
                    self.module(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.module(*static_args, **static_kwargs)
            self._graphs[key] = (graph, (static_args, static_kwargs), out)
        graph, (static_args, static_kwargs), out = self._graphs[key]
        _copy_into(static_args, args)
        _copy_into(static_kwargs, kwargs)
        graph.replay()
        return out

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Generate tokens with a KV cache (see ``flexspeed.inference.generation.generate``).

        Accepts ``input_ids`` positionally or by keyword, ``attention_mask``, and the generation
        keyword arguments (``max_new_tokens``, ``do_sample``, ...). Returns the token ids
        ``(B, T + new)``.

        Raises:
            ConfigError: prompt length plus ``max_new_tokens`` exceeds ``max_out_tokens``.
        """
        input_ids = args[0] if args else kwargs.pop("input_ids")
        attention_mask = args[1] if len(args) > 1 else kwargs.pop("attention_mask", None)
        total = kwargs.get("max_length") or input_ids.shape[-1] + int(kwargs.get("max_new_tokens") or 0)
        if total > self._config.max_out_tokens:
            raise ConfigError(f"prompt ({input_ids.shape[-1]} tokens) plus new tokens makes {total} > "
                              f"max_out_tokens={self._config.max_out_tokens}; raise max_out_tokens in the config "
                              "or generate fewer tokens", key="max_out_tokens")
        from flexspeed.inference.generation import generate

        input_ids = _to_device(input_ids, self.device)
        attention_mask = _to_device(attention_mask, self.device)
        return generate(self.module, input_ids, attention_mask=attention_mask, runner=self.runner, **kwargs)

    def extra_repr(self) -> str:
        return f"tp_size={self.tp_size}, dtype={self.dtype}, device={self.device}"

    def describe(self) -> str:
        """One line: device, dtype, tensor parallelism and the passes applied (kernels, quantization, offload)."""
        from flexspeed.utils.logging import human_bytes

        cfg = self._config
        parts = [f"device {self.device}", f"dtype {str(self.dtype).replace('torch.', '')}"]
        if self.tp_size > 1:
            parts.append(f"tp {self.tp_size}")
        if cfg.replace_with_kernel_inject:
            parts.append("fused kernels")
        if cfg.quantize_bits is not None:
            parts.append(f"int{cfg.quantize_bits} weights")
        if self.offload is not None:
            tiers = self.offload.store.tier_bytes()
            parts.append("offload " + " / ".join(f"{k} {human_bytes(v)}" for k, v in tiers.items()))
        self.runner  # noqa: B018 - re-chosen if the module changed
        parts.append(f"decode: {self.runner_choice.describe()}")
        return ", ".join(parts)

    def describe_loading(self) -> str:
        """``"; read N tensors (X GB) from K files"`` when a checkpoint was loaded, else ``""``."""
        from flexspeed.utils.logging import human_bytes

        r = self.load_report
        if r is None:
            return ""
        return f"; read {len(r.loaded)} tensors ({human_bytes(r.bytes_read)}) from {len(r.files)} file(s)"


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _copy_into(static: Any, new: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(new)
    elif isinstance(static, (list, tuple)):
        for s, n in zip(static, new):
            _copy_into(s, n)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], new[k])

