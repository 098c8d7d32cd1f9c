"""The CUDA tier of ``flexspeed.checkpointing`` and ``flexspeed.accelerator``: ``cpu_checkpointing``
moves the kept block inputs off the GPU (device memory after forward drops by their size) with
gradients equal to the plain run, configured through ``initialize()``; the CUDA accelerator's
methods. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WIDTH, DEPTH, TOKENS = 512, 6, 4096


@pytest.fixture(autouse=True)
def _clean():
    import flexspeed

    ck = flexspeed.checkpointing
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ck._settings, ck._configured_by, ck.mpu = ck.CheckpointingSettings(), None, None
    yield
    ck._settings, ck._configured_by, ck.mpu = ck.CheckpointingSettings(), None, None
    torch.backends.cuda.matmul.allow_tf32 = old
    if dist.is_initialized():
        dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self, use_ckpt: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Dropout(0.1),
                                                  nn.Linear(4 * WIDTH, WIDTH)) for _ in range(DEPTH))
        self.use_ckpt = use_ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import flexspeed

        x = x * 1.0
        for block in self.blocks:
            x = flexspeed.checkpointing.checkpoint(block, x) if self.use_ckpt else block(x)
        return x


def _x() -> torch.Tensor:
    return torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(1)).cuda()


def _run(model: nn.Module) -> tuple[int, list[torch.Tensor]]:
    """(device bytes held after forward beyond the input, gradients)."""
    x = _x()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.manual_seed(3)
    loss = model(x).pow(2).mean()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    return held, [p.grad.clone() for p in model.parameters()]


def test_cpu_checkpointing_moves_kept_inputs_off_the_gpu():
    import flexspeed

    ck = flexspeed.checkpointing
    plain_held, plain = _run(Net(False).cuda())
    ck_held, grads_ck = _run(Net(True).cuda())
    ck.configure(None, checkpoint_in_cpu=True)
    cpu_held, grads_cpu = _run(Net(True).cuda())
    block_input = TOKENS * WIDTH * 4
    assert ck_held < plain_held / 4, (plain_held, ck_held)
    # the DEPTH kept inputs (the first is x * 1.0) are no longer on the device
    assert cpu_held <= ck_held - (DEPTH - 1) * block_input, (ck_held, cpu_held)
    # Tolerance 0: the recomputation runs the same CUDA kernels on bit-identical inputs (the CPU round
    # trip is a copy) with the forward's RNG state replayed; TF32 is off.
    for a, b, c in zip(plain, grads_ck, grads_cpu):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_initialize_applies_cpu_checkpointing_on_cuda():
    import flexspeed

    cfg = {"train_micro_batch_size_per_gpu": TOKENS, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "activation_checkpointing": {"cpu_checkpointing": True, "synchronize_checkpoint_boundary": True}}
    engine, *_ = flexspeed.initialize(model=Net(True), config=cfg)
    assert flexspeed.checkpointing.settings().cpu_checkpointing
    torch.manual_seed(3)
    loss = engine(_x()).pow(2).mean()
    engine.backward(loss)
    got = [p.grad.clone() for p in engine.module.parameters()]
    _, want = _run(Net(False).cuda())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_accelerator():
    from flexspeed.accelerator import CudaAccelerator, get_accelerator

    acc = get_accelerator()
    assert isinstance(acc, CudaAccelerator)
    assert (acc.device_name(), acc.device_name(0), acc.current_device_name()) == ("cuda", "cuda:0", "cuda:0")
    assert acc.communication_backend_name() == "nccl" and acc.device_count() >= 1 and acc.is_available()
    assert acc.is_bf16_supported() and acc.is_fp16_supported()
    assert acc.supported_dtypes() == [torch.float32, torch.float16, torch.bfloat16]
    t = acc.FloatTensor([1.0])
    assert t.is_cuda and acc.on_accelerator(t) and not acc.on_accelerator(t.cpu())
    pinned = acc.pin_memory(torch.ones(4))
    assert acc.is_pinned(pinned)
    acc.manual_seed(7)
    state = acc.get_rng_state()
    a = torch.rand(4, device="cuda")
    acc.set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), a)
    acc.reset_peak_memory_stats()
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    assert acc.max_memory_allocated() >= 256 * 2**20 and acc.memory_allocated() >= 256 * 2**20
    del big
    acc.empty_cache()
    assert acc.total_memory() > acc.available_memory() > 0 and acc.memory_reserved() >= 0
    stream = acc.Stream()
    with acc.stream(stream):
        torch.ones(1, device="cuda").add_(1)
    event = acc.Event()
    event.record()
    acc.synchronize()
    acc.range_push("flexspeed")
    acc.range_pop()
