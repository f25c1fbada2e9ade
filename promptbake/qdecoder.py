"""Fast rollouts on a quantised (bitsandbytes 4-bit / 8-bit) base, without a full-precision copy.

The merged-copy sampler (samplers.MergedCopySampler) needs ordinary weights to fold the
adapter into; a quantised base has none, and copying it out in full precision would undo
the point of quantising. Before this module such a base sampled through the PEFT model:
the HF forward on a DynamicCache, and every LoRA branch dispatched through PEFT at every
token.

`QuantDecoder` is `LeanDecoder` itself (the same forward for both families: static KV cache
written in place, attention, norms, rotary tables, sliding windows, soft-capping) with each
projection computed as

    y = base(x) + (x @ A^T) @ (scale * B)^T

where `base` is the bitsandbytes layer itself (so the quantised weights are read where
they are stored, through the same kernel the exact path and the teacher use: the same
numbers), and the LoRA update is two low-rank products. Projections that read the same
input (q|k|v, gate|up) share one `x @ A^T` with their A factors side by side and a
block-diagonal B. The embedding, the LM head and the norms are referenced, not copied
(Gemma's (1 + w) norms excepted: a few fp32 vectors); the only new memory is the LoRA
factors (rank r) and the KV cache every sampler needs.

Measured on SmolLM2-135M, CPU: see benchmarks/README.md ("quantised rollouts").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decoder
from .decoder import LeanDecoder, unwrap


def quant_layer_types():
    """The bitsandbytes layer classes this decoder reads (imported only when asked)."""
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def unsupported_reason(peft_model) -> str | None:
    """Why `QuantDecoder` can't sample this PEFT-wrapped quantised model, or None when it can."""
    model = peft_model.get_base_model()
    why = decoder.unsupported_reason(model, quantised=quant_layer_types())
    if why:
        return why
    for layer in model.model.layers:
        for name in decoder.PROJECTIONS:
            why = _lora_reason(layer.get_submodule(name))
            if why:
                return f"{name}: {why}"
    for module in (model.model.embed_tokens, model.get_output_embeddings()):
        if hasattr(module, "get_base_layer"):
            return f"LoRA on the {type(unwrap(module)).__name__} embedding or head"
    return None


def _lora_reason(module) -> str | None:
    """Why a (possibly LoRA-wrapped) projection's adapter can't run as two low-rank products."""
    if not hasattr(module, "lora_A"):
        return None
    for name in _active(module):
        if module.use_dora.get(name) or name in getattr(module, "lora_variant", {}):
            return "a LoRA variant (DoRA and the like)"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out LoRA"
    return None


def _active(module) -> list[str]:
    return [n for n in module.active_adapters if n in module.lora_A]


class _Projection:
    """Linear layers that read the same input, run as one: their bases, then one shared LoRA update.

    (…, D_in) -> (…, sum of D_out): the outputs side by side, in the order given.
    """

    def __init__(self, modules, dtype):
        self.modules = modules
        self.bases = [unwrap(m) for m in modules]
        self.dtype = dtype
        self.sizes = [b.out_features for b in self.bases]
        rank = sum(m.lora_A[n].out_features for m in modules if hasattr(m, "lora_A") for n in _active(m))
        device = self.bases[0].weight.device
        in_features = self.bases[0].in_features
        # A factors stacked (R, D_in); B factors, times their scaling, block-diagonal (sum D_out, R).
        self.A = torch.zeros(rank, in_features, dtype=dtype, device=device) if rank else None
        self.B = torch.zeros(sum(self.sizes), rank, dtype=dtype, device=device) if rank else None
        self.refresh()

    def load(self, weight_of) -> None:
        """LeanDecoder.load's call: the quantised bases are read as stored, so only their own weights
        can go in; the LoRA factors are copied afresh."""
        if any(weight_of(m) is not base.weight for m, base in zip(self.modules, self.bases)):
            raise NotImplementedError("QuantDecoder reads the quantised weights as stored; call refresh() instead")
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the live LoRA factors in (after an optimizer step)."""
        if self.A is None:
            return
        row = col = 0
        for module, size in zip(self.modules, self.sizes):
            for name in _active(module) if hasattr(module, "lora_A") else ():
                a, b = module.lora_A[name].weight, module.lora_B[name].weight  # (r, D_in), (D_out, r)
                r = a.shape[0]
                self.A[col : col + r].copy_(a)
                self.B[row : row + size, col : col + r].copy_(b).mul_(module.scaling[name])
                col += r
            row += size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [base(x) for base in self.bases]  # the quantised matmuls, as the exact path runs them
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.A is None:
            return y
        return y.add_(F.linear(F.linear(x.to(self.dtype), self.A), self.B).to(y.dtype))


class QuantDecoder(LeanDecoder):
    """`LeanDecoder` over a PEFT model whose base layers are bitsandbytes-quantised.

    Reads the model's own weights (no copy; the embedding and the head as plain tensors);
    `refresh()` copies the LoRA factors in after each optimizer step. Sampling only: no gradients.
    """

    def __init__(self, peft_model):
        model = peft_model.get_base_model()
        # the compute dtype: bitsandbytes returns outputs in the input's dtype
        super().__init__(model, unwrap(model.model.embed_tokens).weight.dtype, pack=False)

    def _projection(self, modules) -> _Projection:
        return _Projection(modules, self.dtype)

    def refresh(self) -> None:
        for linear in self.linears():
            if isinstance(linear, _Projection):
                linear.refresh()


class QuantisedSampler:
    """The own decode loop on `QuantDecoder`: the quantised weights as stored, LoRA as low-rank products."""

    def __init__(self, peft_model, args):
        self.peft_model = peft_model
        self.decoder = QuantDecoder(peft_model)
        self.args = args
        kind = _quant_kind(peft_model)
        self.description = f"LeanDecoder on the {kind} weights (bitsandbytes matmuls, LoRA as low-rank products)"

    def refresh(self) -> None:
        self.decoder.refresh()

    def sample(self, prompts, generator):
        from .sampling import sample

        self.peft_model.eval()  # bitsandbytes 8-bit layers pick their kernel from the training flag
        return sample(self.decoder, prompts, generator=generator, **self.args.kwargs())


def _quant_kind(peft_model) -> str:
    import bitsandbytes as bnb

    for module in peft_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return "4-bit"
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "8-bit"
    return "quantised"
