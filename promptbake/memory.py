"""Peak memory of a bake, estimated from a model config and the settings, before any weight loads.

A bake's memory is the weights, the fast sampler's merged copy of them (an unquantised base
only) and the adapter's training state, always resident, plus the largest of three phases
that never overlap: the rollout (KV cache for batch x (prompt + response)), the teacher pass
(no gradient: one layer's working set over the whole batch), and the student pass with its
backward (activations kept for the backward, for one micro-batch, plus one loss chunk's
logits). `estimate_peak_memory` adds these up from the
architecture's sizes; `MemoryEstimate.advice` says which setting to lower when the total
won't fit, with the estimate each change would give.

The per-token activation count follows a Llama-style layer under PEFT LoRA on a frozen
base: bitsandbytes' 4-bit matmul saves no activation (its weight gets no gradient), so what
is kept is each LoRA input and rank-r output, the two RMSNorms (an fp32 copy each), the
attention inputs and output (flash / memory-efficient SDPA: no T x T scores on CUDA), and
the SwiGLU's gate, up and product. With gradient checkpointing only each layer's input
stays, and one layer's activations are rebuilt at a time. Figures are estimates (allocator
slack and the CUDA context come on top); benchmarks/gpu_check.py prints them beside the
measured peaks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# Bytes per weight of a quantised linear layer: NF4 with double quantisation stores 4 bits per
# weight, one 8-bit absmax per 64 weights and one fp32 per 256 absmax; LLM.int8 one byte per
# weight and one fp32 scale per row (left out: under 0.1%).
_QUANT_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
_LOSS_FLOATS = 5  # (chunk, V) fp32 tensors alive at once in the chunked exact reverse KL
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSizes:
    layers: int
    hidden: int
    intermediate: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # KV heads x head_dim
    vocab: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one layer."""
        H, I = self.hidden, self.intermediate
        return {"q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
                "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


@dataclass(frozen=True)
class Settings:
    """The settings an estimate depends on (the distill options of the same names)."""

    quant: str  # "4bit", "8bit" or "none" (as resolved: not "auto")
    dtype: str  # compute dtype: "bfloat16", "float16" or "float32"
    batch_size: int
    micro_batch_size: int | None  # None: the whole batch
    max_new_tokens: int
    prompt_tokens: int  # longest student prompt, in tokens
    teacher_prompt_tokens: int  # longest teacher prompt (system prompt + user prompt)
    lora_rank: int
    lora_targets: str  # "all-linear" or comma-separated module names
    chunk_size: int
    gradient_checkpointing: bool
    rollout_copy: str | None = None  # dtype of the fast sampler's merged copy of the weights; None: no copy


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes, by part. `peak` = resident + the largest phase."""

    settings: Settings
    sizes: ModelSizes
    weights: int
    adapter: int  # LoRA weights, their gradients and AdamW's two moments
    rollout: int  # KV cache for the batch (the rollout phase)
    teacher: int  # teacher pass working set, whole batch, no gradient
    activations: int  # student pass activations kept for the backward (one micro-batch)
    loss_chunk: int  # (chunk, V) logits and loss buffers
    params: int  # parameters of the base model
    rollout_copy: int = 0  # the fast sampler's merged copy of the weights (an unquantised base only)

    @property
    def resident(self) -> int:
        return self.weights + self.rollout_copy + self.adapter

    @property
    def largest_phase(self) -> str:
        return max((self.rollout, "rollout"), (self.teacher, "teacher pass"), (self.student, "student backward"))[1]

    @property
    def student(self) -> int:
        return self.activations + self.loss_chunk

    @property
    def peak(self) -> int:
        return self.resident + max(self.rollout, self.teacher, self.student)

    def fits(self, budget_bytes: float) -> bool:
        return self.peak <= budget_bytes

    def lines(self) -> list[str]:
        """The breakdown, one part per line, in GiB."""
        s = self.settings
        micro = s.micro_batch_size or s.batch_size
        ckpt = "on" if s.gradient_checkpointing else "off"
        copy = [f"rollout copy (merged weights, {s.rollout_copy}): {_gib(self.rollout_copy)}"] if self.rollout_copy else []
        return [
            f"weights ({s.quant}, {s.dtype} compute, {self.params / 1e9:.2f} B params): {_gib(self.weights)}",
            *copy,
            f"LoRA r={s.lora_rank} + gradients + AdamW state: {_gib(self.adapter)}",
            f"rollout KV cache ({s.batch_size} x {s.prompt_tokens + s.max_new_tokens} tokens): {_gib(self.rollout)}",
            f"teacher pass ({s.batch_size} x {s.teacher_prompt_tokens + s.max_new_tokens} tokens, no grad): "
            f"{_gib(self.teacher)}",
            f"student activations ({micro} rollouts at a time, checkpointing {ckpt}): {_gib(self.activations)}",
            f"loss chunk ({s.chunk_size} tokens): {_gib(self.loss_chunk)}",
            f"peak: {_gib(self.peak)} (resident {_gib(self.resident)} + {self.largest_phase})",
        ]

    def advice(self, budget_bytes: float) -> list[str]:
        """What to lower so the estimate fits `budget_bytes`, each with the peak it would give; [] if it fits.

        Tried in order of what costs the result least: the settings that change nothing but
        memory (checkpointing, micro-batches, loss chunk) first, then quantisation, then the
        ones that change the bake (batch size, response length)."""
        if self.fits(budget_bytes):
            return []
        s, out = self.settings, []
        for change, label in self._candidates():
            est = estimate_from_sizes(self.sizes, dataclasses.replace(s, **change))
            mark = "fits" if est.fits(budget_bytes) else "still over"
            out.append(f"{label}: peak {_gib(est.peak)} ({mark})")
            if est.fits(budget_bytes):
                break
        return out

    def _candidates(self):
        s = self.settings
        if not s.gradient_checkpointing:
            yield {"gradient_checkpointing": True}, "--gradient-checkpointing on"
        micro = s.micro_batch_size or s.batch_size
        for m in (4, 2, 1):
            if m < micro:
                yield {"gradient_checkpointing": True, "micro_batch_size": m}, \
                    f"--gradient-checkpointing on --micro-batch-size {m}"
        if s.chunk_size > 32:
            yield {"gradient_checkpointing": True, "micro_batch_size": 1, "chunk_size": 32}, \
                "... and --chunk-size 32"
        if s.quant != "4bit":
            yield {"quant": "4bit", "gradient_checkpointing": True, "micro_batch_size": 1}, \
                "--quant 4bit with checkpointing and --micro-batch-size 1"
        base = {"quant": "4bit", "gradient_checkpointing": True, "micro_batch_size": 1}
        for b in (4, 2, 1):
            if b < s.batch_size:
                yield {**base, "batch_size": b}, f"... and --batch-size {b} (changes the bake)"
        for n in (256, 128):
            if n < s.max_new_tokens:
                yield {**base, "batch_size": 1, "max_new_tokens": n}, f"... and --max-new-tokens {n} (changes the bake)"


def estimate_peak_memory(
    config,
    *,
    quant: str,
    dtype: str = "bfloat16",
    batch_size: int,
    micro_batch_size: int | None = None,
    max_new_tokens: int,
    prompt_tokens: int,
    teacher_prompt_tokens: int | None = None,
    lora_rank: int = 16,
    lora_targets: str = "all-linear",
    chunk_size: int = 128,
    gradient_checkpointing: bool = False,
    rollout_copy: str | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of a bake of the model `config` describes (a transformers config or
    a dict of its fields) with these settings. `dtype` is the compute dtype ("bfloat16" on
    CUDA, "float32" on CPU); `prompt_tokens` the longest rendered student prompt and
    `teacher_prompt_tokens` the longest teacher prompt (default: prompt_tokens); `rollout_copy` the
    dtype of the fast sampler's merged copy of the weights, where the bake keeps one."""
    settings = Settings(quant=quant, dtype=str(dtype).removeprefix("torch."), batch_size=batch_size,
                        micro_batch_size=micro_batch_size, max_new_tokens=max_new_tokens,
                        prompt_tokens=prompt_tokens,
                        teacher_prompt_tokens=prompt_tokens if teacher_prompt_tokens is None else teacher_prompt_tokens,
                        lora_rank=lora_rank, lora_targets=lora_targets, chunk_size=chunk_size,
                        gradient_checkpointing=gradient_checkpointing,
                        rollout_copy=None if rollout_copy is None else str(rollout_copy).removeprefix("torch."))
    return estimate_from_sizes(model_sizes(config), settings)


def model_sizes(config) -> ModelSizes:
    """The sizes an estimate needs, from a transformers config (its text config) or a dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(text, k, d))
    text = None if isinstance(config, dict) else config.get_text_config()
    H, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or H // heads
    return ModelSizes(layers=get("num_hidden_layers"), hidden=H, intermediate=get("intermediate_size") or 4 * H,
                      q_dim=heads * head_dim, kv_dim=(get("num_key_value_heads") or heads) * head_dim,
                      vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)))


def estimate_from_sizes(m: ModelSizes, s: Settings) -> MemoryEstimate:
    b = _DTYPE_BYTES[s.dtype]
    L, H, I = m.layers, m.hidden, m.intermediate
    linears = m.linears()
    linear_params = L * sum(i * o for i, o in linears.values())
    embed_params = m.vocab * H * (1 if m.tied else 2)
    norm_params = (2 * L + 1) * H
    per_weight = _QUANT_BYTES.get(s.quant, b)
    weights = int(linear_params * per_weight + (embed_params + norm_params) * b)
    if s.quant in _QUANT_BYTES:  # one projection dequantised in flight (forward and backward)
        weights += max(i * o for i, o in linears.values()) * b

    targets = _targets(s.lora_targets)
    r = s.lora_rank
    lora_params = L * sum(r * (i + o) for name, (i, o) in linears.items() if name in targets)
    adapter = lora_params * 4 * 4  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq

    T = s.prompt_tokens + s.max_new_tokens
    rollout = 2 * L * m.kv_dim * s.batch_size * T * b + s.batch_size * m.vocab * 4  # K and V; (B, V) logits

    T_teacher = s.teacher_prompt_tokens + s.max_new_tokens
    teacher_tokens = s.batch_size * T_teacher
    # no grad: the layer's KV (kept: use_cache), plus one layer's widest temporaries; out: (N, H) states
    teacher = (2 * L * m.kv_dim * teacher_tokens * b + teacher_tokens * (3 * I + 2 * H + m.q_dim) * b
               + s.batch_size * s.max_new_tokens * H * b)

    micro = s.micro_batch_size or s.batch_size
    tokens = micro * T
    lora_r = r * len([n for n in linears if n in targets])
    per_layer = (b * (2 * H + 2 * m.q_dim + 2 * m.kv_dim + m.q_dim + 4 * I)  # LoRA inputs, SDPA q|k|v|out, SwiGLU
                 + 2 * (4 * H + b * H)  # two RMSNorms: fp32 copy and output
                 + 4 * lora_r)  # rank-r LoRA outputs (fp32)
    if s.gradient_checkpointing:
        kept = tokens * (L * H * b + per_layer)  # each layer's input, one layer rebuilt at a time
    else:
        kept = tokens * L * per_layer
    backward_work = tokens * 2 * (H + I) * b  # gradient buffers of the layer being differentiated
    final = tokens * H * (4 + b) + s.batch_size * s.max_new_tokens * H * b * 2  # final norm; leaf + its grad
    activations = int(kept + backward_work + final + s.batch_size * s.max_new_tokens * H * b)  # + teacher states

    loss_chunk = _LOSS_FLOATS * s.chunk_size * m.vocab * 4
    params = linear_params + embed_params + norm_params
    return MemoryEstimate(settings=s, sizes=m, weights=weights, adapter=adapter, rollout=rollout,
                          teacher=int(teacher), activations=activations, loss_chunk=loss_chunk, params=params,
                          rollout_copy=params * _DTYPE_BYTES[s.rollout_copy] if s.rollout_copy else 0)


def free_memory(device) -> int | None:
    """Bytes a bake could still take on `device`: free GPU memory on CUDA; on a CPU the kernel's
    MemAvailable, lowered to a container's (cgroup v2) headroom where it has a limit. None where unknown."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current", encoding="ascii").read())
        if limit != "max":
            free = min(free if free is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _targets(spec: str) -> set[str]:
    if spec == "all-linear":
        return set(_ALL_LINEAR)
    return {t.strip().rsplit(".", 1)[-1] for t in spec.split(",") if t.strip()}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
