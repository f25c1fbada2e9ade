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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


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
        self.bias = None  # (B, S_max) additive key bias: 0 where a row may attend, -inf elsewhere
        self.length = 0  # columns of the cache written so far
        self.positions = None  # (B, 1) position of each row's next token

    def destinations(self) -> dict:
        return self._destinations

    def _attention(self, layer: _Layer, h: torch.Tensor, cos, sin, start: int) -> torch.Tensor:
        B, T, _ = h.shape
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        q, k, v = qkv.view(B, T, nq + 2 * nk, d).split([nq, nk, nk], dim=2)  # (B, T, heads, d)
        if layer.q_norm is not None:
            q, k = _rms(q, *layer.q_norm), _rms(k, *layer.k_norm)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        end = start + T
        layer.k_cache[:, :, start:end] = k.transpose(1, 2)
        layer.v_cache[:, :, start:end] = v.transpose(1, 2)
        keys, values = layer.k_cache[:, :, :end], layer.v_cache[:, :, :end]  # (B, nk, S, d)
        if T == 1:
            # One query per row: grouped heads share a KV head without copying it.
            scores = torch.matmul(q.view(B, nk, nq // nk, d), keys.transpose(-1, -2)) * self.scaling
            scores = scores + self.bias[:, None, None, :end]
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, values).view(B, 1, nq * d)
        else:
            col = torch.arange(end, device=h.device)[None, :]
            row = torch.arange(start, end, device=h.device)[:, None]
            allowed = (self.bias[:, None, None, :end] == 0) & (col <= row)  # (B, 1, T, S): padding, causal
            allowed |= col == row  # a padding query attends to itself: no empty softmax rows, no NaN
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=allowed,
                                                 scale=self.scaling, enable_gqa=True)
            out = out.transpose(1, 2).reshape(B, T, nq * d)
        return F.linear(out, layer.o, layer.o_bias)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) ids at (B, T) positions, written after the cached columns -> (B, V) last logits."""
        start = self.length
        x = F.embedding(ids, self.embed)  # (B, T, D)
        cos, sin = self.rotary(x, positions)  # (B, T, d)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        for layer in self.layers:
            x = x + self._attention(layer, _rms(x, *layer.ln1), cos, sin, start)
            gate, up = F.linear(_rms(x, *layer.ln2), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)
        self.length = start + ids.shape[1]
        return F.linear(_rms(x[:, -1], *self.norm), self.head)[:, : self.vocab]

    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Prefill left-padded (B, L) prompts; room for max_new_tokens more. -> (B, V) next-token logits."""
        B, L = ids.shape
        size = L + max_new_tokens
        for layer in self.layers:
            shape = (B, self.n_kv, size, self.head_dim)
            if layer.k_cache is None or layer.k_cache.shape != shape:
                layer.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
                layer.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.bias = torch.full((B, size), float("-inf"), dtype=self.dtype, device=self.device)
        self.bias[:, :L].masked_fill_(mask.bool(), 0.0)
        self.length = 0
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, self.positions)
        self.positions = self.positions[:, -1:] + 1
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one (B,) token per row -> (B, V) next-token logits."""
        if self.length >= self.bias.shape[1]:
            raise RuntimeError("LeanDecoder: KV cache full; pass a larger max_new_tokens to start()")
        self.bias[:, self.length] = 0.0
        logits = self._forward(tokens[:, None], self.positions)
        self.positions = self.positions + 1
        return logits

    def release(self) -> None:
        """Free the KV cache between rollouts."""
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None
        self.bias = None


def _is_lora(module) -> bool:
    return hasattr(module, "get_base_layer")
