"""A Linear layer whose weight oneDNN has pre-packed for this CPU.

``F.linear`` on CPU hands oneDNN a plain row-major weight, which oneDNN reorders into its blocked
format on every call. For the one- to few-row products of decoding that reorder costs as much as
the product: measured on torch 2.13 (AVX-512 host, one thread, 3072x768 weight), bf16 one row
0.185 ms with ``F.linear`` against 0.087 ms pre-packed, 16 rows 0.47 against 0.36 ms; long
prompts are unchanged. :class:`PackedLinear` packs once, keeps only the packed copy (no extra
memory), and reads back as a dense ``weight`` for state dicts, pickling and quantization.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PackedLinear", "can_pack"]

_PACKABLE = (torch.float32, torch.bfloat16)


@functools.cache
def _packing_works() -> bool:
    """oneDNN's packed linear exists and agrees with ``F.linear`` on this build and CPU."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        return False
    try:
        g = torch.Generator().manual_seed(0)  # never the user's global RNG: a seeded generate samples the same
        w, x = torch.randn(32, 16, generator=g), torch.randn(3, 16, generator=g)
        y = mkldnn._linear_pointwise(x, mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except RuntimeError:
        return False


@torch.library.custom_op("flexspeed::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The packed product as an opaque op: Inductor then hands it realised inputs (its own lowering of
    ``mkldnn._linear_pointwise`` rejects a fused elementwise producer, e.g. an RMSNorm)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


@_packed_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear`` through oneDNN on a *plain* weight (it reorders the weight on the fly), or ``None``
    where that does not apply. For prompt-sized inputs (many rows) on the CPU: torch 2.13's fp32 and
    bf16 ``F.linear`` of 128 rows over OPT-125M-shaped weights took about 2x oneDNN's time (see
    ``FusedRunner``'s prompt); for a few rows the reorder costs more than it saves."""
    if not can_pack(weight) or x.dtype != weight.dtype or x.device.type != "cpu":
        return None
    return _packed_linear_op(x, weight, bias)


def can_pack(weight: torch.Tensor) -> bool:
    """A CPU fp32/bf16 weight on a build with oneDNN's packed linear."""
    return weight.device.type == "cpu" and weight.dtype in _PACKABLE and _packing_works()


class PackedLinear(nn.Module):
    """``nn.Linear`` semantics over a oneDNN pre-packed weight (falls back to plain storage).

    The packed weight is an opaque tensor held outside the parameters; ``weight`` returns a dense
    copy (an allocation: meant for inspection, state dicts and quantization). ``model.to(...)``
    re-packs, or stores the weight plainly where packing does not apply (CUDA, fp16).
    """

    tied_embedding: str | None = None
    """Qualified name of the embedding this layer's weight was tied to before packing (``lm_head``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._store(linear.weight.detach())

    def _store(self, dense: torch.Tensor) -> None:
        self.packed = can_pack(dense)
        self._w = torch.ops.mkldnn._reorder_linear_weight(dense.contiguous(), 1) if self.packed else dense

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight (a copy when packed)."""
        return self._w.to_dense() if self.packed else self._w

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * self._w.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.dtype == self._w.dtype and x.device.type == "cpu":
            if torch.compiler.is_compiling():
                return _packed_linear_op(x, self._w, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self._w, self.bias, "none", [], "")
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{'oneDNN-packed' if self.packed else 'plain'} {self._w.dtype}")

    # ---------------------------------------------------------------- dtype/device, state, pickling

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._store(fn(self.weight))
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, "
                                  f"the model has {(self.out_features, self.in_features)}")
                return
            self._store(w.detach().to(self._w.dtype).clone())
        elif strict:
            missing_keys.append(key)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_w"], state["packed"] = self.weight, False  # opaque tensors neither pickle nor deepcopy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._store(self._w)
