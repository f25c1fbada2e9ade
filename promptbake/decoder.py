"""A lean decoder for sampling: fused weights, a static KV cache, few ops per token.

At batch 8 a decode step does little arithmetic: its floor is reading every weight once
(memory bandwidth). What the Hugging Face forward adds on top is per-call work: seven
separate projections per layer, a KV cache concatenated at every token, mask building,
and a flash-attention kernel set up for a single query. `LeanDecoder` runs the same
computation as the HF model (RMSNorm, rotary embeddings from the model's own rotary
module, grouped-query attention, a gated MLP) on:

- fused weights: one q|k|v projection and one gate|up projection per layer, kept on CPU
  prepacked for oneDNN's matmul (see `_Linear`);
- a preallocated KV cache written in place, one column per step for the whole batch
  (rows are left-padded, so every row's next token lands in the same column);
- an additive key bias that masks padding, updated in place;
- for one-token steps, attention as two batched matmuls in which grouped query heads
  share their KV head without copying it; a sliding-window layer reads only the last
  `window` columns of its cache (every row's window covers the same columns);
- logits only where a token is drawn: the last prompt position at prefill.

Two families of layers:

- Llama (Llama, SmolLM, Qwen2, Qwen3, Mistral): pre-norm blocks, SwiGLU, RMSNorm
  scaled by its weight; per-head q/k norms for Qwen3; sliding windows where the
  config sets them.
- Gemma (Gemma, Gemma 2, Gemma 3 text): embeddings scaled by sqrt(hidden), RMSNorm
  scaled by (1 + weight) in fp32, GeGLU (tanh GELU), a norm after attention and after
  the MLP as well as before (Gemma 2/3), per-head q/k norms (Gemma 3), sliding-window
  and global layers with their own rotary tables (Gemma 3's local/global base
  frequencies), attention scale query_pre_attn_scalar ** -0.5, and tanh soft-capping
  of final logits where the config has it and of attention scores on Gemma 2 (as HF does).

`unsupported_reason` says why any other model falls back to the HF forward. Sampling
only: no gradients, no training.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F

LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")
ARCHITECTURES = LLAMA_FAMILY + GEMMA_FAMILY
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The MLP activations the decoder computes, by the class transformers' ACT2FN gives them.
_ACTIVATIONS = {"SiLU": F.silu, "SiLUActivation": F.silu,
                "GELUTanh": lambda x: F.gelu(x, approximate="tanh"),
                "PytorchGELUTanh": lambda x: F.gelu(x, approximate="tanh")}


def unwrap(module):
    """The module itself, or the layer a PEFT wrapper wraps."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def unsupported_reason(model, quantised: tuple = ()) -> str | None:
    """Why `LeanDecoder` can't run this (unwrapped) causal LM, or None when it can.

    `quantised`: layer classes a subclass computes its projections with, accepted beside plain
    linear layers (qdecoder's bitsandbytes layers)."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r}"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention"
    kinds = set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        return f"attention layer type {sorted(kinds)[0]!r}"
    try:
        for layer in model.model.layers:
            for name in PROJECTIONS:
                linear = unwrap(layer.get_submodule(name))
                if isinstance(linear, quantised):
                    continue
                if type(linear) is not torch.nn.Linear or not linear.weight.dtype.is_floating_point:
                    return f"{name} is a {type(linear).__name__} ({linear.weight.dtype}), not a plain linear layer"
            act = type(layer.mlp.act_fn).__name__
            if act not in _ACTIVATIONS:
                return f"activation {act}"
            _eps(layer.input_layernorm), _eps(layer.post_attention_layernorm)
            layer.self_attn.head_dim, layer.self_attn.scaling  # noqa: B018
        model.model.rotary_emb, model.model.norm, model.model.embed_tokens  # noqa: B018
    except AttributeError as err:
        return f"unexpected module layout ({err})"
    return None


def _eps(norm) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


class _Norm:
    """RMSNorm as HF computes it for the family.

    Llama: normalise in fp32, cast back, then scale by the weight.
    Gemma: normalise and scale by (1 + weight) both in fp32, then cast back.
    """

    def __init__(self, module, dtype, gemma: bool):
        self.eps = _eps(module)
        self.gemma = gemma
        w = module.weight.detach()
        self.weight = (1.0 + w.float()) if gemma else w.to(dtype, copy=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _rope_tables(rotary, x: torch.Tensor, positions: torch.Tensor, layer_type) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for `positions` (..., T), shaped (..., T, 1, d) to broadcast over heads.

    The model's own rotary module computes them, so every rope variant it supports applies here
    (Gemma 3's takes the layer type: local and global layers rotate at different base frequencies).
    """
    cos, sin = rotary(x, positions) if layer_type is None else rotary(x, positions, layer_type)  # (..., T, d)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(-2), signed_sin.unsqueeze(-2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) with the sign in signed_sin."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, D) @ (V, D).T for a weight far wider than x is tall: an LM head.

    On CPU this runs as (weight @ x.T).T: for a few rows against a wide weight the BLAS then
    streams the weight about twice as fast (2-core AVX2 build machine with another job running, Gemma 3's
    262k x 640 head: 8 rows 301 -> 113 ms, 128 rows 934 -> 642 ms). The same products, summed in another order.
    Elsewhere (CUDA) it is F.linear.
    """
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight)
    return torch.mm(weight, x.t()).t().contiguous()


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


_CAN_PACK: dict = {}


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch build and CPU run oneDNN's prepacked matmul in `dtype` (tried once, on a small weight)."""
    if device.type != "cpu":
        return False
    if dtype not in _CAN_PACK:
        try:
            w, x = torch.randn(24, 16).to(dtype), torch.randn(3, 16).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
            _CAN_PACK[dtype] = bool(torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2))
        except (AttributeError, RuntimeError, NotImplementedError):  # no mkldnn build, or no kernel for dtype here
            _CAN_PACK[dtype] = False
    return _CAN_PACK[dtype]


_SHARED: dict = {}  # id(weight) -> (weakref to it, its version, its packed copy)


def shared_pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked copy of a weight nobody writes (an LM head), one per weight, shared.

    The sampler's head and the loss's heads read the same frozen weight: one packed copy
    serves them all, made on first use and dropped when the weight is. A weight changed in
    place (its version moves) is packed again. Check `can_pack` first.
    """
    key = id(weight)
    entry = _SHARED.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    if entry is None:
        weakref.finalize(weight, _SHARED.pop, key, None)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _SHARED[key] = (weakref.ref(weight), weight._version, packed)
    return packed


class _PackedLinear(torch.autograd.Function):
    """x @ weight.T through a prepacked copy of a frozen weight; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x, weight, packed):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.to(weight.dtype) @ weight, None, None


def head_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, D) @ (V, D).T for an LM head, the fastest exact way this device has.

    A frozen head on a CPU with oneDNN: through the shared packed copy (`shared_pack`; the
    gradient reaches x, as the head is frozen); else `wide_linear`.
    """
    if (x.dim() == 2 and not weight.requires_grad and x.dtype == weight.dtype
            and x.device.type == "cpu" and can_pack(weight.dtype, weight.device)):
        return _PackedLinear.apply(x, weight, shared_pack(weight))
    return wide_linear(x, weight)


class _Linear:
    """The linear layers `modules` (which read the same input) as one projection: outputs side by side.

    On CPU the fused weight is kept only in oneDNN's prepacked layout, where the build and the CPU
    have it: at the few rows a decode step multiplies, oneDNN's kernel on a packed weight runs
    1.5-2.5x faster than F.linear (MKL) on the 2-core AVX2 build machine, for every projection
    shape of SmolLM2 and Gemma 3 and for their LM heads (benchmarks/README.md, "Prepacked
    weights"). Elsewhere the weight is a plain tensor. `load` rebuilds it from each module's
    current weight, so merged LoRA weights go in by loading again.
    """

    def __init__(self, modules, dtype, *, pack: bool, wide: bool = False):
        self.modules = list(modules)
        self.dtype = dtype
        layers = [unwrap(m) for m in self.modules]
        self.bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers]).to(dtype)
        self.pack = pack and can_pack(dtype, layers[0].weight.device)
        self.wide = wide  # an LM head: a few rows against a very wide weight
        self.weight = self.packed = None

    def load(self, weight_of) -> None:
        """Set the fused weight from `weight_of(module)` for each module (a module's own weight: unwrap(m).weight)."""
        parts = [weight_of(m) for m in self.modules]
        own = len(parts) == 1 and parts[0] is unwrap(self.modules[0]).weight and parts[0].dtype == self.dtype
        if self.pack and self.wide and own and not parts[0].requires_grad:  # a frozen head: the loss packs it too
            self.weight, self.packed = None, shared_pack(parts[0])
            return
        parts = [part.detach() for part in parts]
        weight = parts[0].to(self.dtype) if len(parts) == 1 else torch.cat(parts).to(self.dtype)
        if self.pack:
            self.weight, self.packed = None, torch.ops.mkldnn._reorder_linear_weight(weight)
        else:  # one module in its own dtype: the module's tensor itself, read and never written
            self.weight, self.packed = weight, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.wide and self.bias is None:
            return wide_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def _window(model, index: int) -> int | None:
    """The sliding window of layer `index` (keys within `window` columns of the query), or None for global."""
    attn = model.model.layers[index].self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2/3 and Gemma set it per layer (None on global layers)
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None


class _Layer:
    def __init__(self, layer, dtype, gemma: bool, window: int | None, rope_key, projection):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = projection([attn.o_proj])
        self.gate_up = projection([mlp.gate_proj, mlp.up_proj])
        self.down = projection([mlp.down_proj])
        self.linears = (self.qkv, self.o, self.gate_up, self.down)
        self.act = _ACTIVATIONS[type(mlp.act_fn).__name__]

        def norm(module):
            return None if module is None else _Norm(module, dtype, gemma)

        self.ln_attn = norm(layer.input_layernorm)
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2/3 normalise blocks' outputs too
        self.ln_attn_out = norm(layer.post_attention_layernorm) if sandwich else None
        self.ln_mlp = norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm)
        self.ln_mlp_out = norm(layer.post_feedforward_layernorm) if sandwich else None
        self.q_norm = norm(getattr(attn, "q_norm", None))  # Qwen3 and Gemma 3 normalise q and k per head
        self.k_norm = norm(getattr(attn, "k_norm", None))
        self.window = window
        self.rope_key = rope_key  # which rotary table: None for one table, else the layer type
        self.k_cache = self.v_cache = None


class LeanDecoder:
    """Batched sampling forward of a Llama- or Gemma-family model on fused (on CPU, prepacked) weights.

    `load(weight_of)` sets every weight from `weight_of(module)` for the model's modules (PEFT
    wrappers included; `modules()` lists them), so merged LoRA weights go in by loading again.
    A module's weight that needs no cast or fusing is read where the model keeps it, not copied.
    `pack=False` keeps plain tensors on CPU too (the equality tests compare both).
    """

    def __init__(self, model, dtype: torch.dtype, *, pack: bool = True):
        inner, cfg = model.model, model.config
        gemma = cfg.model_type in GEMMA_FAMILY
        attn = inner.layers[0].self_attn
        self.dtype, self.pack = dtype, pack
        # Gemma 3's rotary module keeps one table per layer type and is called with it.
        per_type_rope = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(inner.layers)
        self.layers = [_Layer(layer, dtype, gemma, _window(model, i), types[i] if per_type_rope else None,
                              self._projection) for i, layer in enumerate(inner.layers)]
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        # Gemma 2 soft-caps attention scores; HF's Gemma 3 attention never reads its config's
        # attn_logit_softcapping (Gemma 3 checkpoints set none), so neither does this copy.
        self.attn_cap = getattr(cfg, "attn_logit_softcapping", None) if cfg.model_type == "gemma2" else None
        self.logit_cap = getattr(cfg, "final_logit_softcapping", None)
        self.device = inner.embed_tokens.weight.device
        self.rotary = inner.rotary_emb
        self.norm = _Norm(inner.norm, dtype, gemma)
        self.embed_module, head_module = inner.embed_tokens, model.get_output_embeddings()
        scale = getattr(unwrap(self.embed_module), "embed_scale", None)  # Gemma: sqrt(hidden), in the weights' dtype
        self.embed_scale = None if scale is None else scale.to(dtype)
        self.embed = None
        self.head = _Linear([head_module], dtype, pack=pack, wide=True)
        self.vocab = cfg.vocab_size
        self.load(lambda module: unwrap(module).weight)
        self.key_bias = None  # (B * nk, 1, S_max) additive key bias: 0 where a row may attend, -inf elsewhere
        self.length = 0  # columns of the cache written so far
        self.positions = None  # (B, 1) position of each row's next token

    def _projection(self, modules) -> _Linear:
        """The layers `modules`, which read the same input, as one projection (qdecoder overrides it)."""
        return _Linear(modules, self.dtype, pack=self.pack)

    def linears(self) -> list[_Linear]:
        return [linear for layer in self.layers for linear in layer.linears] + [self.head]

    def modules(self) -> set:
        """The model's modules whose weights this copy holds."""
        return {self.embed_module} | {m for linear in self.linears() for m in linear.modules}

    @torch.no_grad()
    def load(self, weight_of, changed=None) -> None:
        """Set the weights from `weight_of(module)`: the embedding, each fused projection, the head.

        `changed`: only the weights that hold one of these modules (the rest stay as they are).
        """
        if changed is None or self.embed_module in changed:
            self.embed = weight_of(self.embed_module).detach().to(self.dtype)
        for linear in self.linears():
            if changed is None or any(m in changed for m in linear.modules):
                linear.load(weight_of)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden states -> (B, V) logits: the only positions whose logits are needed."""
        return _softcap(self.head(self.norm(x))[:, : self.vocab], self.logit_cap)

    def _tables(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """Rotary tables for each distinct rope key of the layers, computed once per forward."""
        return {key: _rope_tables(self.rotary, x, positions, key) for key in {layer.rope_key for layer in self.layers}}

    def _qk(self, layer: _Layer, heads: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries and keys from (..., q|k|v heads, d) projections."""
        nq, nk = self.n_heads, self.n_kv
        if layer.q_norm is None:  # one rotation for queries and keys together
            qk = _rotate(heads.narrow(-2, 0, nq + nk), cos, sin)
            return qk.narrow(-2, 0, nq), qk.narrow(-2, nq, nk)
        q = _rotate(layer.q_norm(heads.narrow(-2, 0, nq)), cos, sin)
        return q, _rotate(layer.k_norm(heads.narrow(-2, nq, nk)), cos, sin)

    def _block(self, layer: _Layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual adds of the attention output (already o-projected) and the MLP, with Gemma's output norms."""
        if layer.ln_attn_out is not None:
            attn_out = layer.ln_attn_out(attn_out)
        x = x + attn_out
        gate, up = layer.gate_up(layer.ln_mlp(x)).chunk(2, dim=-1)
        mlp_out = layer.down(layer.act(gate) * up)
        if layer.ln_mlp_out is not None:
            mlp_out = layer.ln_mlp_out(mlp_out)
        return x + mlp_out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) prompt ids (mask: 1 on real tokens) at (B, T) positions into an empty cache -> (B, V) last logits."""
        B, T = ids.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = self._embed(ids)  # (B, T, D)
        tables = self._tables(x, positions)  # each (B, T, 1, d)
        col = torch.arange(T, device=x.device)
        causal = col[None, :] <= col[:, None]  # (T, T): query row, key column
        allowed = {}
        for window in {layer.window for layer in self.layers}:  # padding, causal, and the window where there is one
            ok = causal if window is None else causal & (col[:, None] - col[None, :] < window)
            # a padding query sees itself: no empty rows, no NaN
            allowed[window] = (mask.bool()[:, None, None, :] & ok) | torch.eye(T, dtype=torch.bool, device=x.device)
        for layer in self.layers:
            heads = layer.qkv(layer.ln_attn(x)).view(B, T, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, *tables[layer.rope_key])
            v = heads.narrow(-2, nq + nk, nk)
            layer.k_cache[:, :, :T] = k.transpose(1, 2)
            layer.v_cache[:, :, :T] = v.transpose(1, 2)
            out = self._prefill_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed[layer.window])
            x = self._block(layer, x, layer.o(out.transpose(1, 2).reshape(B, T, nq * d)))
        self.length = T
        return self._logits(x[:, -1])

    def _prefill_attention(self, q, k, v, allowed: torch.Tensor) -> torch.Tensor:
        """(B, nq, T, d) queries over (B, nk, T, d) keys and values, (B, 1, T, T) bool mask -> (B, nq, T, d)."""
        if not self.attn_cap:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling, enable_gqa=True)
        # Soft-capping squashes the scores before the mask: no fused kernel does that, so spell it out.
        group = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = _softcap(q @ k.transpose(-1, -2) * self.scaling, self.attn_cap).masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new (B,) token per row -> (B, V) logits. The hidden state stays (B, D), and attention
        is two batched matmuls in which grouped query heads share their KV head without a copy."""
        B, col = tokens.shape[0], self.length
        end = col + 1
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        x = self._embed(tokens)  # (B, D)
        tables = self._tables(x, self.positions[:, 0])  # each (B, 1, d): broadcasts over heads
        for layer in self.layers:
            heads = layer.qkv(layer.ln_attn(x)).view(B, nq + 2 * nk, d)
            q, k = self._qk(layer, heads, *tables[layer.rope_key])
            layer.k_cache[:, :, col] = k
            layer.v_cache[:, :, col] = heads.narrow(-2, nq + nk, nk)
            # A sliding-window layer sees the last `window` columns: the same columns for every row.
            first = 0 if layer.window is None else max(0, end - layer.window)
            S = end - first
            keys = layer.k_cache[:, :, first:end].view(B * nk, S, d)  # merging (B, nk) needs no copy
            values = layer.v_cache[:, :, first:end].view(B * nk, S, d)
            bias = self.key_bias[:, :, first:end]  # (B * nk, 1, S)
            queries = q.reshape(B * nk, nq // nk, d)
            if self.attn_cap:
                scores = _softcap(torch.bmm(queries, keys.transpose(1, 2)) * self.scaling, self.attn_cap) + bias
            else:
                scores = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=self.scaling)
            probs = scores.softmax(-1, dtype=torch.float32).to(x.dtype)
            out = torch.bmm(probs, values).view(B, nq * d)
            x = self._block(layer, x, layer.o(out))
        self.length = end
        return self._logits(x)

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

