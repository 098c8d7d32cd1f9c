"""Reproduction of DeepSpeedExamples' ``training/cifar/cifar10_deepspeed.py`` (not its code).

The same DeepSpeed surface, written for these tests: module-level imports of
``deepspeed.accelerator.get_accelerator`` and ``deepspeed.moe.utils``; DeepSpeed's config flags plus
``--epochs``, ``--dtype``, ``--stage``, ``--moe``, ``--moe-param-group``; the script's own config dict
(batch 16, Adam, WarmupLR, clipping 1.0, fp16/bf16 switches, ZeRO bucket settings);
``init_distributed()``, ``get_accelerator().set_device``; ``initialize(args=..., config=...,
training_data=...)``; inputs cast to the engine's 16-bit dtype (``bfloat16_enabled()`` /
``fp16_enabled()``); the training loop; evaluation through the engine with per-class accuracy.
Like the original it imports ``deepspeed``; the runner rewrites the imports to flexspeed.
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer


def parse():
    p = argparse.ArgumentParser(description="CIFAR")
    p.add_argument("-e", "--epochs", default=30, type=int)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--log-interval", type=int, default=2000)
    p.add_argument("--dtype", default="fp16", type=str, choices=["bf16", "fp16", "fp32"])
    p.add_argument("--stage", default=0, type=int, choices=[0, 1, 2, 3])
    p.add_argument("--moe", default=False, action="store_true")
    p.add_argument("--num-experts", type=int, nargs="+", default=[1])
    p.add_argument("--moe-param-group", default=False, action="store_true")
    return deepspeed.add_config_arguments(p).parse_args()


def config_for(args):
    return {
        "train_batch_size": 16, "steps_per_print": 2000,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                     "warmup_num_steps": 1000}},
        "gradient_clipping": 1.0, "prescale_gradients": False,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "fp16_master_weights_and_grads": False, "loss_scale": 0,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15},
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": args.stage, "allgather_partitions": True, "reduce_scatter": True,
                              "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000, "overlap_comm": True,
                              "contiguous_gradients": True, "cpu_offload": False},
    }


class SmallConvNet(nn.Module):
    """Two conv/pool stages and three linear layers (the tutorial network); an MoE head with --moe."""

    def __init__(self, args):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84)
        self.experts = None
        if args.moe:
            self.experts = nn.ModuleList([deepspeed.moe.layer.MoE(hidden_size=84, expert=nn.Linear(84, 84),
                                                                  num_experts=n) for n in args.num_experts])
        self.out = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv2(self.pool(F.relu(self.conv1(x))))))
        x = F.relu(self.fc2(F.relu(self.fc1(x.view(-1, 16 * 5 * 5)))))
        for layer in self.experts or ():
            x, _, _ = layer(x)
        return self.out(x)


def evaluate(engine, testset, device, dtype, batch=4):
    hits, seen = [0.0] * 10, [0.0] * 10
    engine.eval()
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(testset, batch_size=batch, shuffle=False):
            images = images.to(dtype) if dtype is not None else images
            predicted = engine(images.to(device)).argmax(1)
            right = (predicted == labels.to(device)).squeeze()
            for i in range(batch):
                hits[labels[i]] += right[i].item()
                seen[labels[i]] += 1
    if engine.local_rank == 0:
        print(f"accuracy on {int(sum(seen))} test images: {100 * sum(hits) / sum(seen):.0f} %")
        for c in range(10):
            print(f"class {c}: {100 * hits[c] / seen[c]:.0f} %")


def main(args):
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK")))
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if torch.distributed.get_rank() != 0:
        torch.distributed.barrier()  # rank 0 downloads first
    trainset = torchvision.datasets.CIFAR10(root="./data", train=True, download=True, transform=preprocess)
    testset = torchvision.datasets.CIFAR10(root="./data", train=False, download=True, transform=preprocess)
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    net = SmallConvNet(args)
    params = filter(lambda p: p.requires_grad, net.parameters())
    if args.moe_param_group:
        params = split_params_into_different_moe_groups_for_optimizer(
            {"params": [p for p in net.parameters()], "name": "parameters"})
    engine, _, trainloader, _ = deepspeed.initialize(args=args, model=net, model_parameters=params,
                                                     training_data=trainset, config=config_for(args))
    device = get_accelerator().device_name(engine.local_rank)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.half if engine.fp16_enabled() else None
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        running = 0.0
        for i, (images, labels) in enumerate(trainloader):
            images, labels = images.to(device), labels.to(device)
            loss = criterion(engine(images.to(dtype) if dtype is not None else images), labels)
            engine.backward(loss)
            engine.step()
            running += loss.item()
            if engine.local_rank == 0 and i % args.log_interval == args.log_interval - 1:
                print(f"[{epoch + 1}, {i + 1}] loss: {running / args.log_interval:.3f}")
                running = 0.0
    print("Finished Training")
    evaluate(engine, testset, device, dtype)


if __name__ == "__main__":
    main(parse())
