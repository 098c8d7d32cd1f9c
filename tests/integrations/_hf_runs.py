"""Rank functions for the Hugging Face Trainer / Accelerate parity tests (spawned by ``run_ranks``).

Each rank first takes flexspeed's DeepSpeed identity (as ``python -m flexspeed.as_deepspeed`` would), then
imports transformers/accelerate, so their "is DeepSpeed installed" checks see it. Heavy imports stay inside
the functions: the spawned ranks import this module before anything else.
"""

from __future__ import annotations

import os
from typing import Any

VOCAB, SEQ, SAMPLES = 96, 16, 32


def take_identity() -> None:
    from flexspeed.integrations.identity import activate

    activate()


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def tiny_llama(seed: int = 0) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config())


class TokenData:
    """``SAMPLES`` fixed random sequences; labels = input ids (the model shifts them)."""

    def __init__(self, n: int = SAMPLES) -> None:
        import torch

        g = torch.Generator().manual_seed(1234)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)  # learnable: each sequence counts up by its step
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def ds_config(stage: int, bf16: bool = False) -> dict:
    """A typical HF-style DeepSpeed config: "auto" everywhere the Trainer fills in."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": "auto",
                     "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"})
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": zero, "steps_per_print": float("inf"),
            "wall_clock_breakdown": False}


def _reset_accelerate() -> None:
    """Forget Accelerate's process-wide state between runs (the process group stays): each run decides
    afresh whether it is a DeepSpeed run."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def trainer_run(out_dir: str, deepspeed: dict | None, bf16: bool = False, max_steps: int = 4,
                resume_from: str | None = None, save_steps: int | None = None) -> tuple[list[float], Any]:
    """Train the tiny Llama with HF's Trainer (AdamW + linear schedule, accumulation 2) and return the logged losses."""
    from transformers import Trainer, TrainingArguments

    _reset_accelerate()
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        lr_scheduler_type="linear", weight_decay=0.01, max_steps=max_steps, logging_steps=1, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0, data_seed=0,
        bf16=bf16, use_cpu=True, deepspeed=deepspeed, dataloader_num_workers=0, disable_tqdm=True,
        max_grad_norm=1.0, save_only_model=False)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    trainer.train(resume_from_checkpoint=resume_from)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def _saved_weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def rank_trainer_parity(rank: int, world: int, out_dir: str, stage: int, bf16: bool) -> dict:
    """The DDP Trainer run, then the same under ``deepspeed=``; both save_model; rank 0 reads both back."""
    take_identity()
    ddp, trainer = trainer_run(os.path.join(out_dir, "ddp"), None, bf16=bf16)
    trainer.save_model(os.path.join(out_dir, "ddp-final"))
    ds, trainer = trainer_run(os.path.join(out_dir, f"z{stage}"), ds_config(stage, bf16), bf16=bf16)
    assert trainer.is_deepspeed_enabled and type(trainer.deepspeed).__module__ == "flexspeed.runtime.engine"
    trainer.save_model(os.path.join(out_dir, "ds-final"))  # ZeRO-3: the consolidated 16-bit state dict
    out: dict = {"ddp": ddp, "ds": ds}
    if rank == 0:
        a, b = _saved_weights(os.path.join(out_dir, "ddp-final")), _saved_weights(os.path.join(out_dir, "ds-final"))
        out["saved_keys_equal"] = sorted(a) == sorted(b)
        out["saved_max_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        out["saved_dtypes"] = sorted({str(t.dtype) for t in b.values()})
    return out


def rank_trainer_resume(rank: int, world: int, out_dir: str, stage: int) -> dict:
    """Train 4 steps saving at 2; a new Trainer resumes from checkpoint-2 and must log the same last 2 losses."""
    take_identity()
    full, _ = trainer_run(out_dir, ds_config(stage), save_steps=2)
    resumed, _ = trainer_run(out_dir, ds_config(stage), resume_from=os.path.join(out_dir, "checkpoint-2"))
    return {"full": full, "resumed": resumed, "files": sorted(os.listdir(os.path.join(out_dir, "checkpoint-2")))}


def rank_trainer_grid(rank: int, world: int, out_dir: str, stage: int) -> dict:
    """fp32 and bf16 parity runs at one ZeRO stage in one spawned group (process start-up dominates)."""
    return {prec: rank_trainer_parity(rank, world, os.path.join(out_dir, prec), stage, prec == "bf16")
            for prec in ("fp32", "bf16")}


def rank_trainer_resume_grid(rank: int, world: int, out_dir: str) -> dict:
    return {stage: rank_trainer_resume(rank, world, os.path.join(out_dir, f"z{stage}"), stage) for stage in (2, 3)}


def accelerate_losses(stage: int | None, bf16: bool = False, steps: int = 8) -> tuple[list[float], dict]:
    """A plain Accelerate loop (accumulate 2, AdamW + linear schedule, clip 1.0); ``stage=None`` is its DDP run.

    Returns the per-micro-step losses and the final whole weights (gathered at ZeRO-3).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from torch.utils.data import DataLoader

    _reset_accelerate()
    plugin = None
    if stage is not None:
        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=2, gradient_clipping=1.0,
                                 zero3_save_16bit_model=stage == 3)
        plugin.deepspeed_config["steps_per_print"] = float("inf")
    # On a machine without accelerators: the process state is made with cpu=True (gloo over all ranks), the
    # Accelerator without it (Accelerator(cpu=True) turns its DeepSpeed path off), as HF's Trainer does.
    from accelerate.state import PartialState

    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=2,
                              mixed_precision="bf16" if bf16 else "no")
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / (steps // 2)))
    loader = DataLoader(TokenData(), batch_size=2, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if stage is not None:
        assert type(model).__module__ == "flexspeed.runtime.engine", type(model)
    model.train()
    losses = []
    for i, batch in enumerate(loader):
        if i == steps:
            break
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(float(loss.detach()))
    state = accelerator.get_state_dict(model)
    weights = {k: v.float().clone() for k, v in state.items()} if state is not None else {}
    accelerator.free_memory()
    return losses, weights


def rank_accelerate_parity(rank: int, world: int, out_dir: str, stage: int, bf16: bool) -> dict:
    take_identity()
    ddp, w_ddp = accelerate_losses(None, bf16)
    ds, w_ds = accelerate_losses(stage, bf16)
    out: dict = {"ddp": ddp, "ds": ds}
    if rank == 0:
        out["keys_equal"] = sorted(w_ddp) == sorted(w_ds)
        out["max_weight_diff"] = max(float((w_ddp[k] - w_ds[k]).abs().max()) for k in w_ddp)
    return out


def rank_accelerate_grid(rank: int, world: int, out_dir: str) -> dict:
    return {f"z{stage}-{'bf16' if bf16 else 'fp32'}": rank_accelerate_parity(rank, world, out_dir, stage, bf16)
            for stage, bf16 in ((2, False), (3, False), (3, True))}


class LiveBytes:
    """A dispatch mode that follows every CPU storage made by a torch op inside it until the storage is freed;
    ``peak`` is the most bytes alive at once (storages made outside torch ops, e.g. safetensors' mmap, are not
    counted)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                result = func(*args, **(kwargs or {}))
                outer._see(result)
                return result

        self._mode = _Mode()
        self._live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0

    def _see(self, result) -> None:  # noqa: ANN001
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        added = False
        for t in tree_leaves(result):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or (key in self._live and not self._live[key][0].expired()):
                continue
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            added = True
        if added:
            for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
                del self._live[key]
            self.current = sum(n for _, n in self._live.values())
            self.peak = max(self.peak, self.current)

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._mode.__exit__(*exc)


def rank_zero3_from_pretrained(rank: int, world: int, out_dir: str) -> dict:
    """HF's ZeRO-3 load path: ``from_pretrained`` under ``zero.Init`` + ``GatheredParameters(modifier_rank=0)``.

    Rank 0 saves a random tiny Llama; with a ZeRO-3 HF DeepSpeed config alive, every rank loads it: each rank
    then holds only its 1/world chunk of each weight (the parameters are storage-less placeholders); after
    ``deepspeed.initialize`` the logits equal a plain (non-DeepSpeed) load's.
    """
    take_identity()
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dist.init_process_group("gloo")
    folder = os.path.join(out_dir, "pretrained")
    if rank == 0:
        tiny_llama(seed=5).save_pretrained(folder)
    dist.barrier()
    plain = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = TokenData(4).ids
    with torch.no_grad():
        want = plain(input_ids=ids).logits
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": float("inf")}
    keep = HfDeepSpeedConfig(cfg)  # HF's switch for the ZeRO-3 load path (kept alive while loading)
    with LiveBytes() as live:  # every CPU storage any torch op makes during the load, while it is alive
        model = LlamaForCausalLM.from_pretrained(folder)
    params = list(model.parameters())
    chunk_numel = sum(p.ds_tensor.numel() for p in params if p.ds_tensor is not None)
    out = {"all_placeholders": all(p.numel() == 0 and p.device.type == "cpu" and p.ds_tensor is not None
                                   for p in params),
           "chunk_numel": chunk_numel, "full_numel": sum(p.ds_numel for p in params),
           "peak_bytes": live.peak, "largest_param_bytes": max(p.ds_numel for p in params) * 4,
           "model_bytes": sum(p.ds_numel for p in params) * 4}
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    with torch.no_grad():
        got = engine(input_ids=ids).logits
    out["max_logit_diff"] = float((got - want).abs().max())
    del keep
    dist.destroy_process_group()
    return out


def rank_trainer_config_optimizer(rank: int, world: int, out_dir: str) -> dict:
    """The DeepSpeed config names the optimizer ("AdamW", "auto" hyperparameters filled by the Trainer); the
    schedule stays HF's linear one (Accelerate passes it to initialize() as a callable). Must log the losses
    of the DDP run with HF's own AdamW + linear schedule."""
    take_identity()
    ddp, _ = trainer_run(os.path.join(out_dir, "ddp"), None)
    cfg = ds_config(3)
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}}
    ds, trainer = trainer_run(os.path.join(out_dir, "cfgopt"), cfg)
    return {"ddp": ddp, "ds": ds, "optimizer": type(trainer.deepspeed.optimizer).__name__}


def rank_trainer_from_pretrained_z3(rank: int, world: int, out_dir: str) -> dict:
    """The whole HF flow at ZeRO-3: TrainingArguments(deepspeed=...) first, then from_pretrained (zero.Init +
    GatheredParameters loading), then Trainer.train; against the DDP Trainer on a plain load of the same folder."""
    take_identity()
    import torch.distributed as dist
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    folder = os.path.join(out_dir, "pretrained")
    out: dict = {}
    for name, ds in (("ddp", None), ("z3", ds_config(3))):
        _reset_accelerate()
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-2, lr_scheduler_type="linear", max_steps=3, logging_steps=1, report_to=[],
            save_strategy="no", seed=0, use_cpu=True, deepspeed=ds, disable_tqdm=True)
        if name == "ddp":
            if rank == 0:
                tiny_llama(seed=5).save_pretrained(folder)
            dist.barrier()
        model = LlamaForCausalLM.from_pretrained(folder)
        if name == "z3":
            out["placeholders"] = all(p.numel() == 0 and p.ds_tensor is not None for p in model.parameters())
        trainer = Trainer(model=model, args=args, train_dataset=TokenData())
        trainer.train()
        out[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return out


def rank_trainer_refusals(rank: int, world: int, out_dir: str) -> dict:
    """DeepSpeed features the Trainer asks for that flexspeed cannot do: each fails when training starts, before
    any step, with the option and the fix."""
    take_identity()
    out = {}
    for name, extra in (("autotp", {"tensor_parallel": {"autotp_size": 2}}),
                        ("nvme", {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})):
        cfg = dict(ds_config(2), **extra)
        try:
            losses, _ = trainer_run(os.path.join(out_dir, name), cfg, max_steps=1)
            out[name] = f"no error, losses {losses}"
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            out[name] = f"{type(e).__name__}: {e}"
    return out
