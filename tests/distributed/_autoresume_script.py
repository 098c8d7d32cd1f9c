"""Training script for the kill tests (tests/distributed/test_autoresume.py): it never calls
load_checkpoint; the config's checkpoint.auto_resume does. On the first attempt, rank KILL_RANK
SIGKILLs itself at optimizer step KILL_STEP, micro-step KILL_MICRO of it (0 or 1; KILL_STEP -1: never),
or with KILL_MICRO 2 inside the save of that step (after the tensors are written, before the commit).

Usage: python _autoresume_script.py OUT STEPS KILL_STEP KILL_MICRO STAGE ASYNC"""

import os
import signal
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import TensorDataset

import flexspeed
from flexspeed.testing import die_inside_save

out, steps, kill_step, kill_micro, stage, async_save = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                                         int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 1000,
       "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "zero_optimization": {"stage": stage},
       "checkpoint": {"save_dir": os.path.join(out, "ckpt"), "save_interval": 2, "keep_last": 2,
                      "auto_resume": True, "async_save": async_save}}
engine, _, loader, _ = flexspeed.initialize(model=model, training_data=data, config=cfg)
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
if first_attempt and kill_micro == 2 and int(os.environ["RANK"]) == 1:
    # KILL_MICRO 2: die inside the save of global_step<KILL_STEP>, after DCP wrote the tensors, before the commit
    die_inside_save(kill_step)
while engine.global_steps < steps:
    for x, y in loader:
        if (first_attempt and engine.global_rank == 1 and engine.global_steps == kill_step
                and engine.micro_steps % 2 == kill_micro):
            os.kill(os.getpid(), signal.SIGKILL)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        if engine.global_steps >= steps:
            break
full = get_model_state_dict(engine.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if engine.global_rank == 0:
    torch.save({k: v.clone() for k, v in full.items()}, os.path.join(out, "final.pt"))
    with open(os.path.join(out, "attempts.txt"), "w") as f:
        f.write(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
