"""Pipeline training script for the kill tests (tests/distributed/test_autoresume.py): it never calls
load_checkpoint; the config's checkpoint.auto_resume does, through the same autosaver as the data-parallel
engine. On the first attempt, the last rank SIGKILLs itself before optimizer step KILL_STEP (KILL_MODE 0;
KILL_STEP -1: never) or inside the save of global_step<KILL_STEP> (KILL_MODE 1: after the tensors are
written, before the commit). The world is dp x pp with pp = 2; batches come from the engine's own loader.

Usage: python _pipe_autoresume_script.py OUT STEPS KILL_STEP KILL_MODE STAGE ASYNC"""

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import flexspeed
from flexspeed.testing import die_inside_save
from flexspeed.pipe import LayerSpec, PipelineModule

out, steps, kill_step, kill_mode, stage, async_save = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                                        int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(96, 8, generator=g), torch.randn(96, 4, generator=g))
specs = [LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 16), LayerSpec(nn.Tanh),
         LayerSpec(nn.Linear, 16, 4)]
model = PipelineModule(specs, num_stages=2, loss_fn=nn.functional.mse_loss, seed_layers=True)
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 1000,
       "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "gradient_clipping": 0.5,
       "zero_optimization": {"stage": stage}, "pipeline": {"schedule": "1f1b"},
       "checkpoint": {"save_dir": os.path.join(out, "ckpt"), "save_interval": 2, "keep_last": 2,
                      "auto_resume": True, "async_save": async_save}}
engine, _, _, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(), training_data=data,
                                       config=cfg)
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
killer = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
if first_attempt and killer and kill_mode == 1:
    die_inside_save(kill_step)
losses = []
while engine.global_steps < steps:
    if first_attempt and killer and kill_mode == 0 and engine.global_steps == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    losses.append(float(engine.train_batch()))
full = engine.module.to_sequential_state_dict()
if engine.global_rank == 0:
    torch.save({k: v.clone() for k, v in full.items()}, os.path.join(out, "final.pt"))
    with open(os.path.join(out, "attempts.txt"), "w") as f:
        f.write(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
