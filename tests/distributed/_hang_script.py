"""A 2-rank training script for tests/distributed/test_hangs.py: rank 1 stops (SIGSTOP) or sleeps
before the gradient all-reduce of step 2; the config's 10 s timeout and the heartbeat must end the
job and name rank 1. Usage: python _hang_script.py stop|sleep SECONDS OUT_DIR"""

import os
import signal
import sys
import time

import torch

import flexspeed

mode, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
       "flexspeed_distributed": {"timeout_minutes": seconds / 60, "heartbeat_interval": 1}}
engine, *_ = flexspeed.initialize(model=torch.nn.Linear(4, 1), config=cfg)
for step in range(5):
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    if step == 2 and engine.global_rank == 1:
        time.sleep(1.5)  # let the heartbeat publish this rank's activity first
        with open(os.path.join(out, "stopped_at"), "w") as f:
            f.write(repr(time.time()))
        if mode == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            time.sleep(3600)
    engine.backward(loss)
    engine.step()
