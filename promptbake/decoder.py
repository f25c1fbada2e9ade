"""A lean decoder for sampling Llama-family models: fused weights, a static KV cache, few ops per token.

At batch 8 a decode step does little arithmetic: its floor is reading every weight once
(memory bandwidth). What the Hugging Face forward adds on top is per-call work: seven
separate projections per layer, a KV cache concatenated at every token, mask building,
and a flash-attention kernel set up for a single query. `LeanDecoder` runs the same
computation as the HF model (RMSNorm, rotary embeddings from the model's own rotary
module, grouped-query attention, SwiGLU) on:

- fused weights: one q|k|v projection and one gate|up projection per layer;
- a preallocated KV cache written in place, one column per step for the whole batch
  (rows are left-padded, so every row's next token lands in the same column);
- an additive key bias that masks padding, updated in place;
- for one-token steps, attention as two batched matmuls in which grouped query heads
  share their KV head without copying it.

It covers the architectures whose layers are exactly that (Llama, SmolLM, Qwen2,
Qwen3, Mistral without a sliding window); `unsupported_reason` says why any other
model falls back to the HF forward. Sampling only: no gradients, no training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unwrap(module):
    """The module itself, or the layer a PEFT wrapper wraps."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def unsupported_reason(model) -> str | None:
    """Why `LeanDecoder` can't run this (unwrapped) causal LM, or None when it can."""
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
    try:
        for layer in model.model.layers:
            for name in _PROJECTIONS:
                linear = unwrap(layer.get_submodule(name))
                if type(linear) is not torch.nn.Linear or not linear.weight.dtype.is_floating_point:
                    return f"{name} is a {type(linear).__name__} ({linear.weight.dtype}), not a plain linear layer"
            layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon  # noqa: B018
            layer.self_attn.head_dim, layer.self_attn.scaling  # noqa: B018
        model.model.rotary_emb, model.model.norm, model.model.embed_tokens  # noqa: B018
    except AttributeError as err:
        return f"unexpected module layout ({err})"
    return None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it: normalise in fp32, cast back, then scale."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope_tables(rotary, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for `positions` (..., T), shaped (..., T, 1, d) to broadcast over heads.

    The model's own rotary module computes them, so every rope variant it supports applies here.
    """
    cos, sin = rotary(x, positions)  # (..., T, d)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(-2), signed_sin.unsqueeze(-2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) with the sign in signed_sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _copy(t, dtype):
    return None if t is None else t.detach().to(dtype, copy=True)


def _fuse(modules, dtype):
    """One weight (and bias) for linear layers that read the same input: their outputs side by side."""
    layers = [unwrap(m) for m in modules]
    weight = torch.cat([m.weight.detach() for m in layers]).to(dtype)
    bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers]).to(dtype)
    # Each module's rows in the fused weight, for writing merged LoRA weights in later.
    rows, at = {}, 0
    for module, layer in zip(modules, layers):
        rows[module] = weight[at : at + layer.out_features]
        at += layer.out_features
    return weight, bias, rows


class _Layer:
    def __init__(self, layer, dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv, self.qkv_bias, rows = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        self.rows = dict(rows)
        self.o, self.o_bias, rows = _fuse([attn.o_proj], dtype)
        self.rows.update(rows)
        self.gate_up, self.gate_up_bias, rows = _fuse([mlp.gate_proj, mlp.up_proj], dtype)
        self.rows.update(rows)
        self.down, self.down_bias, rows = _fuse([mlp.down_proj], dtype)
        self.rows.update(rows)
        self.ln1 = _norm(layer.input_layernorm, dtype)
        self.ln2 = _norm(layer.post_attention_layernorm, dtype)
        self.q_norm = _norm(getattr(attn, "q_norm", None), dtype)  # Qwen3 normalises q and k per head
        self.k_norm = _norm(getattr(attn, "k_norm", None), dtype)
        self.k_cache = self.v_cache = None


def _norm(module, dtype):
    """(weight, eps) of an RMSNorm module, or None."""
    return None if module is None else (_copy(module.weight, dtype), module.variance_epsilon)


class LeanDecoder:
    """Batched sampling forward of a Llama-family model on its own copy of the weights.

    `destinations()` maps each of the model's modules (PEFT wrappers included) to the
    tensor in this copy that holds its weight, so merged LoRA weights can be written in.
    """

    def __init__(self, model, dtype: torch.dtype):
        inner, cfg = model.model, model.config
        attn = inner.layers[0].self_attn
        self.layers = [_Layer(layer, dtype) for layer in inner.layers]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.dtype = dtype
        self.device = inner.embed_tokens.weight.device
        self.rotary = inner.rotary_emb
        self.norm = _norm(inner.norm, dtype)
        embed_module, head_module = inner.embed_tokens, model.get_output_embeddings()
        self.embed = _copy(unwrap(embed_module).weight, dtype)
        tied = unwrap(head_module).weight is unwrap(embed_module).weight
        self.head = self.embed if tied and not _is_lora(embed_module) and not _is_lora(head_module) \
            else _copy(unwrap(head_module).weight, dtype)
        self.vocab = cfg.vocab_size
        self._destinations = {embed_module: self.embed, head_module: self.head}
        for layer in self.layers:
            self._destinations.update(layer.rows)
        self.key_bias = None  # (B * nk, 1, S_max) additive key bias: 0 where a row may attend, -inf elsewhere
        self.length = 0  # columns of the cache written so far
        self.positions = None  # (B, 1) position of each row's next token

    def destinations(self) -> dict:
        return self._destinations

    def _qk(self, layer: _Layer, heads: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries and keys from (..., q|k|v heads, d) projections."""
        nq, nk = self.n_heads, self.n_kv
        if layer.q_norm is None:  # one rotation for queries and keys together
            qk = _rotate(heads.narrow(-2, 0, nq + nk), cos, sin)
            return qk.narrow(-2, 0, nq), qk.narrow(-2, nq, nk)
        q = _rotate(_rms(heads.narrow(-2, 0, nq), *layer.q_norm), cos, sin)
        return q, _rotate(_rms(heads.narrow(-2, nq, nk), *layer.k_norm), cos, sin)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt ids (mask: 1 on real tokens) at (B, T) positions into an empty cache -> (B, V) last logits."""
        B, T = ids.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed)  # (B, T, D)
        cos, sin = _rope_tables(self.rotary, x, positions)  # (B, T, 1, d)
        col = torch.arange(T, device=x.device)
        allowed = mask.bool()[:, None, None, :] & (col[None, :] <= col[:, None])  # (B, 1, T, T): padding, causal
        allowed |= torch.eye(T, dtype=torch.bool, device=x.device)  # a padding query sees itself: no empty rows, no NaN
        for layer in self.layers:
            heads = F.linear(_rms(x, *layer.ln1), layer.qkv, layer.qkv_bias).view(B, T, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, cos, sin)
            v = heads.narrow(-2, nq + nk, nk)
            layer.k_cache[:, :, :T] = k.transpose(1, 2)
            layer.v_cache[:, :, :T] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=allowed, scale=self.scaling, enable_gqa=True)
            x = x + F.linear(out.transpose(1, 2).reshape(B, T, nq * d), layer.o, layer.o_bias)
            x = x + self._mlp(layer, x)
        self.length = T
        return F.linear(_rms(x[:, -1], *self.norm), self.head)[:, : self.vocab]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new (B,) token per row -> (B, V) logits. The hidden state stays (B, D), and attention
        is two batched matmuls in which grouped query heads share their KV head without a copy."""
        B, col = tokens.shape[0], self.length
        end = col + 1
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(tokens, self.embed)  # (B, D)
        cos, sin = _rope_tables(self.rotary, x, self.positions[:, 0])  # (B, 1, d): broadcasts over heads
        bias = self.key_bias[:, :, :end]  # (B * nk, 1, S)
        for layer in self.layers:
            heads = F.linear(_rms(x, *layer.ln1), layer.qkv, layer.qkv_bias).view(B, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, cos, sin)
            layer.k_cache[:, :, col] = k
            layer.v_cache[:, :, col] = heads.narrow(-2, nq + nk, nk)
            keys = layer.k_cache[:, :, :end].view(B * nk, end, d)  # merging (B, nk) needs no copy
            scores = torch.baddbmm(bias, q.reshape(B * nk, nq // nk, d), keys.transpose(1, 2), alpha=self.scaling)
            probs = scores.softmax(-1, dtype=torch.float32).to(x.dtype)
            out = torch.bmm(probs, layer.v_cache[:, :, :end].view(B * nk, end, d)).view(B, nq * d)
            x = x + F.linear(out, layer.o, layer.o_bias)
            x = x + self._mlp(layer, x)
        self.length = end
        return F.linear(_rms(x, *self.norm), self.head)[:, : self.vocab]

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(_rms(x, *layer.ln2), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down, layer.down_bias)

    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill left-padded (B, L) prompts; room for max_new_tokens more. -> (B, V) next-token logits."""
        B, L = ids.shape
        size = L + max_new_tokens
        for layer in self.layers:
            shape = (B, self.n_kv, size, self.head_dim)
            if layer.k_cache is None or layer.k_cache.shape != shape:
                layer.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
                layer.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._prefill(ids, mask, positions)
        bias = torch.full((B, size), float("-inf"), dtype=self.dtype, device=self.device)
        bias[:, :L].masked_fill_(mask.bool(), 0.0)
        self.key_bias = bias.repeat_interleave(self.n_kv, dim=0)[:, None, :]  # one row per (row, KV head)
        self.positions = positions[:, -1:] + 1
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one (B,) token per row -> (B, V) next-token logits."""
        if self.length >= self.key_bias.shape[-1]:
            raise RuntimeError("LeanDecoder: KV cache full; pass a larger max_new_tokens to start()")
        self.key_bias[:, :, self.length] = 0.0
        logits = self._decode(tokens)
        self.positions = self.positions + 1
        return logits

    def release(self) -> None:
        """Free the KV cache between rollouts."""
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
        self.key_bias = None


def _is_lora(module) -> bool:
    return hasattr(module, "get_base_layer")
