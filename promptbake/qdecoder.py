"""Fast rollouts on a quantised (bitsandbytes 4-bit / 8-bit) base, without a full-precision copy.

The merged-copy sampler (samplers.MergedCopySampler) needs ordinary weights to fold the
adapter into; a quantised base has none, and copying it out in full precision would undo
the point of quantising. Before this module such a base sampled through the PEFT model:
the HF forward on a DynamicCache, and every LoRA branch dispatched through PEFT at every
token.

`QuantDecoder` is `LeanDecoder`'s forward (static KV cache written in place, the same
attention, RMSNorm and rotary code) with each projection computed as

    y = base(x) + (x @ A^T) @ (scale * B)^T

where `base` is the bitsandbytes layer itself (so the quantised weights are read where
they are stored, through the same kernel the exact path and the teacher use: the same
numbers), and the LoRA update is two low-rank products. Projections that read the same
input (q|k|v, gate|up) share one `x @ A^T` with their A factors side by side and a
block-diagonal B. The embedding, the LM head and the norms are referenced, not copied;
the only new memory is the LoRA factors (rank r) and the KV cache every sampler needs.

Measured on SmolLM2-135M, CPU: see benchmarks/README.md ("quantised rollouts").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import ARCHITECTURES, LeanDecoder, unwrap, wide_linear

_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# The same small helpers as decoder.py's (private there): the forward must compute what LeanDecoder's does.
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it: normalise in fp32, cast back, then scale."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope_tables(rotary, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for `positions` (..., T), shaped (..., T, 1, d) to broadcast over heads."""
    cos, sin = rotary(x, positions)  # (..., T, d)
    half = sin.shape[-1] // 2
    return cos.unsqueeze(-2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(-2)


def _norm(module, dtype):
    """(weight, eps) of an RMSNorm module, or None."""
    return None if module is None else (module.weight.detach().to(dtype, copy=True), module.variance_epsilon)


def quant_layer_types():
    """The bitsandbytes layer classes this decoder reads (imported only when asked)."""
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def unsupported_reason(peft_model) -> str | None:
    """Why `QuantDecoder` can't sample this PEFT-wrapped quantised model, or None when it can."""
    model = peft_model.get_base_model()
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "mixed attention layer types"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    kinds = quant_layer_types()
    try:
        for layer in model.model.layers:
            for group in _GROUPS:
                for name in group:
                    module = layer.get_submodule(name)
                    base = unwrap(module)
                    if not isinstance(base, (*kinds, torch.nn.Linear)):
                        return f"{name} is a {type(base).__name__}"
                    why = _lora_reason(module)
                    if why:
                        return f"{name}: {why}"
            layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon  # noqa: B018
            layer.self_attn.head_dim, layer.self_attn.scaling  # noqa: B018
        model.model.rotary_emb, model.model.norm, model.model.embed_tokens  # noqa: B018
    except AttributeError as err:
        return f"unexpected module layout ({err})"
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


class _QLayer:
    def __init__(self, layer, dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.o = _Projection([attn.o_proj], dtype)
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj], dtype)
        self.down = _Projection([mlp.down_proj], dtype)
        self.ln1 = _norm(layer.input_layernorm, dtype)
        self.ln2 = _norm(layer.post_attention_layernorm, dtype)
        self.q_norm = _norm(getattr(attn, "q_norm", None), dtype)
        self.k_norm = _norm(getattr(attn, "k_norm", None), dtype)
        self.k_cache = self.v_cache = None

    def projections(self):
        return (self.qkv, self.o, self.gate_up, self.down)


class QuantDecoder(LeanDecoder):
    """`LeanDecoder`'s sampling forward over a PEFT model whose base layers are bitsandbytes-quantised.

    Reads the model's own weights (no copy); `refresh()` copies the LoRA factors in after each
    optimizer step. Sampling only: no gradients.
    """

    def __init__(self, peft_model):  # noqa: super().__init__ would copy (fuse) the weights
        model = peft_model.get_base_model()
        inner, cfg = model.model, model.config
        embed = unwrap(inner.embed_tokens).weight
        dtype = embed.dtype  # the compute dtype: bitsandbytes returns outputs in the input's dtype
        attn = inner.layers[0].self_attn
        self.layers = [_QLayer(layer, dtype) for layer in inner.layers]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.dtype = dtype
        self.device = embed.device
        self.rotary = inner.rotary_emb
        self.norm = _norm(inner.norm, dtype)
        self.embed = embed.detach()  # referenced, not copied
        self.head = unwrap(model.get_output_embeddings()).weight.detach()
        self.vocab = cfg.vocab_size
        self.key_bias = None
        self.length = 0
        self.positions = None

    def load(self, weight_of, changed=None) -> None:
        raise NotImplementedError("QuantDecoder reads the live weights; call refresh() instead")

    def refresh(self) -> None:
        for layer in self.layers:
            for projection in layer.projections():
                projection.refresh()

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """As LeanDecoder._prefill, with the projections run by `_Projection`."""
        B, T = ids.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed)  # (B, T, D)
        cos, sin = _rope_tables(self.rotary, x, positions)  # (B, T, 1, d)
        col = torch.arange(T, device=x.device)
        allowed = mask.bool()[:, None, None, :] & (col[None, :] <= col[:, None])  # (B, 1, T, T)
        allowed |= torch.eye(T, dtype=torch.bool, device=x.device)  # padding queries see themselves: no NaN
        for layer in self.layers:
            heads = layer.qkv(_rms(x, *layer.ln1)).view(B, T, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, cos, sin)
            v = heads.narrow(-2, nq + nk, nk)
            layer.k_cache[:, :, :T] = k.transpose(1, 2)
            layer.v_cache[:, :, :T] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=allowed, scale=self.scaling, enable_gqa=True)
            x = x + layer.o(out.transpose(1, 2).reshape(B, T, nq * d))
            x = x + self._mlp(layer, x)
        self.length = T
        return wide_linear(_rms(x[:, -1], *self.norm), self.head)[:, : self.vocab]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """As LeanDecoder._decode: one (B,) token per row -> (B, V) logits."""
        B, col = tokens.shape[0], self.length
        end = col + 1
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(tokens, self.embed)  # (B, D)
        cos, sin = _rope_tables(self.rotary, x, self.positions[:, 0])  # (B, 1, d)
        bias = self.key_bias[:, :, :end]  # (B * nk, 1, S)
        for layer in self.layers:
            heads = layer.qkv(_rms(x, *layer.ln1)).view(B, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, cos, sin)
            layer.k_cache[:, :, col] = k
            layer.v_cache[:, :, col] = heads.narrow(-2, nq + nk, nk)
            keys = layer.k_cache[:, :, :end].view(B * nk, end, d)
            scores = torch.baddbmm(bias, q.reshape(B * nk, nq // nk, d), keys.transpose(1, 2), alpha=self.scaling)
            probs = scores.softmax(-1, dtype=torch.float32).to(x.dtype)
            out = torch.bmm(probs, layer.v_cache[:, :, :end].view(B * nk, end, d)).view(B, nq * d)
            x = x + layer.o(out)
            x = x + self._mlp(layer, x)
        self.length = end
        return wide_linear(_rms(x, *self.norm), self.head)[:, : self.vocab]

    @staticmethod
    def _mlp(layer: _QLayer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(_rms(x, *layer.ln2)).chunk(2, dim=-1)
        return layer.down(F.silu(gate) * up)


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
