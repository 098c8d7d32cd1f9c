#!/usr/bin/env python3
"""Reproduction of DeepSpeedExamples' ``training/pipeline_parallelism/train.py`` (not its code).

The same DeepSpeed calls in the same order, written for these tests: command-line flags
(``--steps``, ``--pipeline-parallel-size``, ``--backend``, ``--seed`` and DeepSpeed's config flags),
``init_distributed(dist_backend=...)``, ``LOCAL_RANK`` from the launcher, ``torch.cuda.set_device``,
CIFAR-10 resized to 224x224 behind a rank-0-first barrier, torchvision's AlexNet; with ``-p 0``
data-parallel training through ``engine(inputs)`` / ``backward`` / ``step`` over a
``RepeatingLoader``, else a ``PipelineModule`` of AlexNet's layers trained with ``train_batch()``.
Like the original it imports ``deepspeed``; the runner rewrites that import to flexspeed.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torchvision import transforms
from torchvision.models import AlexNet

import deepspeed
from deepspeed.pipe import PipelineModule
from deepspeed.utils import RepeatingLoader


def cifar_trainset(local_rank, dl_path="/tmp/cifar10-data"):
    preprocess = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                     transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    dist.barrier()  # rank 0 fetches the data first, the others wait for it
    if local_rank != 0:
        dist.barrier()
    dataset = torchvision.datasets.CIFAR10(root=dl_path, train=True, download=True, transform=preprocess)
    if local_rank == 0:
        dist.barrier()
    return dataset


def parse():
    parser = argparse.ArgumentParser(description="CIFAR")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("-s", "--steps", type=int, default=100)
    parser.add_argument("-p", "--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--backend", type=str, default="nccl")
    parser.add_argument("--seed", type=int, default=1138)
    return deepspeed.add_config_arguments(parser).parse_args()


def data_parallel(args):
    torch.manual_seed(args.seed)
    net = AlexNet(num_classes=10)
    engine, _, loader, _ = deepspeed.initialize(args=args, model=net,
                                                model_parameters=[p for p in net.parameters() if p.requires_grad],
                                                training_data=cifar_trainset(args.local_rank))
    batches = iter(RepeatingLoader(loader))
    criterion = torch.nn.CrossEntropyLoss()
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        images, labels = next(batches)
        loss = criterion(engine(images.to(engine.device)), labels.to(engine.device))
        engine.backward(loss)
        engine.step()


def as_layers(net):
    return [*net.features, net.avgpool, lambda x: torch.flatten(x, 1), *net.classifier]


def pipelined(args, partition="parameters"):
    torch.manual_seed(args.seed)
    deepspeed.runtime.utils.set_random_seed(args.seed)
    net = PipelineModule(layers=as_layers(AlexNet(num_classes=10)), loss_fn=torch.nn.CrossEntropyLoss(),
                         num_stages=args.pipeline_parallel_size, partition_method=partition,
                         activation_checkpoint_interval=0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=net,
                                           model_parameters=[p for p in net.parameters() if p.requires_grad],
                                           training_data=cifar_trainset(args.local_rank))
    for _ in range(args.steps):
        engine.train_batch()


if __name__ == "__main__":
    args = parse()
    deepspeed.init_distributed(dist_backend=args.backend)
    args.local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(args.local_rank)
    if args.pipeline_parallel_size == 0:
        data_parallel(args)
    else:
        pipelined(args)
