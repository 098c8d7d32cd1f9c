"""A dp1 x pp2 pipeline for tests/distributed/test_hangs.py: at step 2, rank 1 stops (SIGSTOP) inside a
collective - WHERE ``p2p``: a send/recv of the pipeline schedule; ``gradnorm``: the all_reduce of the global
gradient norm over the stages - after letting its heartbeat publish. The 10 s timeout and the heartbeat must
end the job and name rank 1 with that activity. Usage: python _activity_hang_script.py WHERE SECONDS OUT_DIR"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import schedules

import flexspeed
from flexspeed.pipe import LayerSpec, PipelineModule

where, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model = PipelineModule([LayerSpec(nn.Linear, 4, 8), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 8, 1)], num_stages=2,
                       loss_fn=nn.functional.mse_loss, seed_layers=True)
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
       "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "steps_per_print": 1000,
       "flexspeed_distributed": {"timeout_minutes": seconds / 60, "heartbeat_interval": 1}}
engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)


def stop_here() -> None:
    time.sleep(1.5)  # let the heartbeat publish this rank's activity first
    with open(os.path.join(out, "stopped_at"), "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGSTOP)


if engine.global_rank == 1 and where == "p2p":
    real_p2p = schedules._batch_p2p

    def p2p_then_stop(ops, desc=None):
        if engine.global_steps == 2:
            stop_here()
        return real_p2p(ops, desc)

    schedules._batch_p2p = p2p_then_stop
if engine.global_rank == 1 and where == "gradnorm":
    real_all_reduce = dist.all_reduce

    def all_reduce_then_stop(tensor, *args, **kwargs):
        if engine.global_steps == 2 and kwargs.get("group") is engine.pp_group:
            stop_here()
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce_then_stop
g = torch.Generator().manual_seed(0)
for step in range(5):
    batches = [(torch.randn(2, 4, generator=g), torch.randn(2, 1, generator=g)) for _ in range(2)]
    engine.train_batch(iter(batches))
