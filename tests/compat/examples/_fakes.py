"""Stand-ins for what DeepSpeedExamples' scripts download or import but this environment lacks.

Nothing here changes a script's training logic; it replaces the data source and a few third-party
helpers the scripts use around it:

- ``torchvision`` (not installable next to this torch): ``datasets.CIFAR10`` gives synthetic
  images of CIFAR-10's real shape (3x32x32, 10 classes; 50,000 / 10,000 samples unless shrunk),
  and ``transforms`` apply the requested ``Resize``/``CenterCrop`` to those tensors, so a script
  asking for 224x224 inputs gets 224x224 tensors; ``models.AlexNet`` / ``vgg19`` are the standard
  architectures (ImageNet layout), written here from their published layer lists.
- ``datasets.load_dataset("wikitext", ...)``: synthetic lines of text over a small local
  vocabulary; ``transformers.AutoTokenizer.from_pretrained``: a word-level fast tokenizer built
  locally from that vocabulary, with RoBERTa's special tokens and ids (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4).
- ``fire``, ``loguru``, ``pytz``, ``sh``: the calls HelloDeepSpeed makes (``fire.Fire(fn)`` with
  ``--key=value`` flags, ``loguru.logger``, ``pytz.timezone`` - a fixed clock, see ``_FixedClock`` -,
  ``sh.git.log/diff``).
"""

from __future__ import annotations

import ast
import datetime
import logging
import sys
import types

import torch
import torch.nn as nn

SIZES = {"train": 50_000, "test": 10_000}  # the runners shrink these


# ---- torchvision ------------------------------------------------------------------------------------
class _Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class _Resize:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):  # the shorter side to ``size``, as torchvision's
        h, w = img.shape[-2:]
        short = self.size if isinstance(self.size, int) else min(self.size)
        nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        return torch.nn.functional.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]


class _CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img):
        h, w = img.shape[-2:]
        top, left = (h - self.size[0]) // 2, (w - self.size[1]) // 2
        return img[..., top:top + self.size[0], left:left + self.size[1]]


def _to_tensor():
    return lambda img: img  # the synthetic images are float tensors in [0, 1] already


class _Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, img):
        return (img - self.mean) / self.std


class CIFAR10(torch.utils.data.Dataset):
    """Synthetic CIFAR-10: deterministic random 3x32x32 images in [0, 1]; labels cycle through 0-9, so
    every class is present in any 10 consecutive samples (the real sets are balanced too)."""

    def __init__(self, root=None, train=True, download=False, transform=None, **_):
        self.n = SIZES["train" if train else "test"]
        self.seed = 0 if train else 1
        self.transform = transform

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        img = torch.rand(3, 32, 32, generator=g)
        return (self.transform(img) if self.transform else img), idx % 10


class AlexNet(nn.Module):
    """The ImageNet AlexNet layout (features, 6x6 adaptive pool, three-layer classifier)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        conv = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
        layers: list[nn.Module] = []
        for i, (cin, cout, k, s, p) in enumerate(conv):
            layers += [nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p), nn.ReLU(inplace=True)]
            if i in (0, 1, 4):
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                                        nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg19(num_classes: int = 1000, **_):
    raise NotImplementedError("the examples' fake torchvision provides AlexNet only (the scripts use AlexNet)")


def install_torchvision() -> None:
    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(CIFAR10=CIFAR10)
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Compose, tv.transforms.Resize, tv.transforms.CenterCrop = _Compose, _Resize, _CenterCrop
    tv.transforms.ToTensor, tv.transforms.Normalize = _to_tensor, _Normalize
    tv.models = types.ModuleType("torchvision.models")
    tv.models.AlexNet, tv.models.vgg19 = AlexNet, vgg19
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms, "torchvision.models": tv.models})


# ---- HelloDeepSpeed's data, tokenizer and helpers ---------------------------------------------------
WORDS = [f"w{i}" for i in range(400)]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def synthetic_lines(n: int = 256, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        length = int(torch.randint(8, 40, (1,), generator=g))
        ids = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in ids) + "\n")
    return lines


class FakeHFDataset:
    """The parts of a ``datasets`` Dataset the script uses: filter, map, len, row access."""

    def __init__(self, rows):
        self.rows = list(rows)

    def filter(self, fn):
        return FakeHFDataset(r for r in self.rows if fn(r))

    def map(self, fn):
        return FakeHFDataset({**r, **fn(r)} for r in self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        return self.rows[idx]


def local_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` with RoBERTa's special tokens and ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def _fire(fn):
    """``fire.Fire(fn)``: call ``fn`` with the ``--key=value`` / ``--key value`` flags of ``sys.argv``."""
    kwargs, args = {}, sys.argv[1:]
    i = 0
    while i < len(args):
        key = args[i].lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            i += 1
            value = args[i]
        try:
            kwargs[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.replace("-", "_")] = value
        i += 1
    return fn(**kwargs)


class _ShError(Exception):
    pass


class _FixedClock(datetime.tzinfo):
    """``pytz.timezone(...)`` for the experiment-directory name: ``datetime.now(tz)`` reads a fixed time.

    HelloDeepSpeed names its experiment directory from the current second on every rank; ranks that
    reach that line in different seconds would write one checkpoint into two directories.
    """

    FIXED = datetime.datetime(2024, 1, 1, 12, 0, 0)

    def utcoffset(self, dt):
        return datetime.timedelta(0)

    def dst(self, dt):
        return datetime.timedelta(0)

    def tzname(self, dt):
        return "fixed"

    def fromutc(self, dt):
        return self.FIXED.replace(tzinfo=self)


def install_hello_deepspeed_modules() -> None:
    """``datasets``, ``fire``, ``loguru``, ``pytz``, ``sh``, and a local ``AutoTokenizer.from_pretrained``."""
    import transformers

    ds = types.ModuleType("datasets")
    ds.load_dataset = lambda *a, **k: FakeHFDataset({"text": t} for t in synthetic_lines() + ["", ""])
    ds.arrow_dataset = types.SimpleNamespace(Dataset=FakeHFDataset)
    fire = types.ModuleType("fire")
    fire.Fire = _fire
    loguru = types.ModuleType("loguru")
    loguru.logger = logging.getLogger("hello_deepspeed")
    pytz = types.ModuleType("pytz")
    pytz.timezone = lambda name: _FixedClock()
    sh = types.ModuleType("sh")
    sh.ErrorReturnCode_128 = sh.ErrorReturnCode_129 = _ShError

    def _no_git(*a, **k):
        raise _ShError("no git in the examples' sandbox")

    sh.git = types.SimpleNamespace(log=_no_git, diff=_no_git)
    sys.modules.update({"datasets": ds, "fire": fire, "loguru": loguru, "pytz": pytz, "sh": sh})
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: local_tokenizer())
