"""Student rollouts: sample responses to a batch of prompts.

Two samplers with the same semantics (softmax of logits / temperature, optional
nucleus filter, stop at EOS):

- `sample` is promptbake's own decode loop: one forward per new token on a KV
  cache, no logits processors, and it ends as soon as every row has emitted EOS.
  Run on a `RolloutModel` it uses a plain copy of the weights with the adapter
  folded in, through `LeanDecoder` where the architecture allows.
- `sample_with_generate` calls Hugging Face `generate`, for debugging and as the
  benchmark's baseline.

Both return each row's response token ids, cut after the first EOS (kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import LeanDecoder, unsupported_reason, unwrap


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, padded on the left so every row ends at column L-1."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row from (B, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        probs, order = z.softmax(-1).sort(-1, descending=True)
        weights = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        return order.gather(-1, _draw(weights, generator)[:, None]).squeeze(-1)
    return _draw((z - z.amax(-1, keepdim=True)).exp_(), generator)  # unnormalised: the draw scales by the sum


def _draw(weights: torch.Tensor, generator: torch.Generator, block: int = 1024) -> torch.Tensor:
    """One index per row of (B, V) non-negative weights, with probability weight / row sum.

    An inverse-CDF draw (one uniform per row against running sums) is exact, and ~30x cheaper on
    CPU than torch.multinomial or a Gumbel race, which draw one random number per vocabulary entry.
    It runs in two levels so the float64 running sum covers V / block block masses and one block,
    not all V entries (Gemma's V = 262k: ~3x cheaper than one cumsum over the row). Each level's
    target is kept strictly below its total, so the pick always lands on a non-zero weight.
    """
    B, V = weights.shape
    nb = -(-V // block)
    if nb * block != V:
        weights = F.pad(weights, (0, nb * block - V))  # zero weights: never picked
    blocks = weights.view(B, nb, block)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum_(-1)  # (B, nb) running block masses
    zero = cdf.new_zeros(())
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(cdf[:, -1:], zero))
    # (B, 1): first block whose running mass exceeds u. The clamps only matter for NaN weights (a diverged
    # model): some token comes out, and the bake's finiteness checks stop it, as with one-level draws.
    blk = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)
    below = torch.where(blk > 0, cdf.gather(-1, (blk - 1).clamp(min=0)), zero)  # mass before that block
    inner = blocks.gather(1, blk[:, :, None].expand(B, 1, block)).squeeze(1).cumsum(-1, dtype=torch.float64)
    rest = torch.minimum(u - below, torch.nextafter(inner[:, -1:], zero))  # (B, 1), inside the block's mass
    return (blk * block + torch.searchsorted(inner, rest, right=True)).clamp_(max=V - 1).squeeze(-1)


def _cut_at_eos(tokens: torch.Tensor, eos_ids: list[int]) -> list[list[int]]:
    """(B, n) sampled ids -> per-row lists ending at (and including) the first EOS."""
    out = []
    for row in tokens.tolist():
        for j, t in enumerate(row):
            if t in eos_ids:
                row = row[: j + 1]
                break
        out.append(row)
    return out


class _HFDecoder:
    """`LeanDecoder`'s start/step interface over any HF causal LM: its own forward on a DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def start(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.positions = positions[:, -1:] + 1
        return self.model(ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        logits = self.model(tokens[:, None], attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                            use_cache=True).logits[:, -1]
        self.positions = self.positions + 1
        return logits

    def release(self) -> None:
        self.cache = self.mask = None


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """model: a `LeanDecoder`, or any HF causal LM (PEFT-wrapped included)."""
    decoder = model if isinstance(model, LeanDecoder) else _HFDecoder(model)
    device = decoder.device
    ids, mask = left_pad(prompts, pad_id, device)  # (B, L)
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    new = []
    try:
        logits = decoder.start(ids, mask, max_new_tokens)
        for step in range(max_new_tokens):
            tok = pick_tokens(logits, temperature, top_p, generator).masked_fill_(done, pad_id)  # (B,)
            new.append(tok)
            done |= torch.isin(tok, eos)
            if step == max_new_tokens - 1 or bool(done.all()):  # one host sync per token
                break
            logits = decoder.step(tok)
    finally:
        decoder.release()
    return _cut_at_eos(torch.stack(new, dim=1), eos_ids)


@torch.no_grad()
def sample_with_generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    # generate() draws from the global RNG: seed it from our generator so runs repeat.
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return _cut_at_eos(out[:, ids.shape[1] :], eos_ids)


class RolloutModel:
    """A plain (no LoRA wrappers) copy of the student for sampling, refreshed before each rollout.

    Each refresh puts W + scale * B @ A into the copy's weights, so sampling runs on
    ordinary weights: no per-layer adapter work at every decoded token. The copy is a
    `LeanDecoder` (fused projections, static KV cache) for Llama- and Gemma-family models, else a
    merged HF model; `reason` says why the lean one wasn't used. The copy may use a
    cheaper dtype than training (bf16 on CPUs with native bf16, as RL frameworks sample
    with vLLM in bf16); the loss is still computed by the training weights at full
    precision, on exactly the tokens sampled here.
    """

    def __init__(self, peft_model, dtype, *, lean: bool = True):
        from peft.tuners.lora import LoraLayer

        base = peft_model.get_base_model()
        self.loras = [m for m in base.modules() if isinstance(m, LoraLayer)]
        self.reason = unsupported_reason(base) if lean else "lean decoder turned off"
        if self.reason is None:
            self.model = LeanDecoder(base, dtype)
            held = self.model.modules()
            missing = [m for m in self.loras if m not in held]
            if missing:
                self.reason = f"LoRA on {type(unwrap(missing[0])).__name__} layers"
        if self.reason is None:
            self.targets = None
        else:
            import copy

            plain = copy.deepcopy(peft_model).merge_and_unload()  # same modules, LoRA wrappers removed
            self.model = plain.to(dtype).eval().requires_grad_(False)
            names = {m: n for n, m in base.named_modules()}
            self.targets = [(lora, self.model.get_submodule(names[lora]).weight) for lora in self.loras]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        if self.targets is None:  # LeanDecoder: rebuild its fused (and packed) weights with the merged ones
            loras = set(self.loras)
            self.model.load(lambda m: _merged_weight(m) if m in loras else unwrap(m).weight, changed=loras)
            return
        for lora, weight in self.targets:
            weight.copy_(_merged_weight(lora))


def _merged_weight(lora) -> torch.Tensor:
    """The LoRA layer's effective weight, W + sum of scale * B @ A over its active adapters."""
    from peft.tuners.lora import Linear

    weight = lora.get_base_layer().weight
    names = [n for n in lora.active_adapters if n in lora.lora_A or n in getattr(lora, "lora_embedding_A", {})]
    if isinstance(lora, Linear) and not lora.fan_in_fan_out and not any(lora.use_dora.get(n) for n in names):
        for n in names:  # one fused multiply-add per adapter, no intermediate delta
            weight = torch.addmm(weight, lora.lora_B[n].weight, lora.lora_A[n].weight, alpha=lora.scaling[n])
        return weight
    return weight + sum(lora.get_delta_weight(n) for n in names)


def rollout_dtype(train_dtype, device):
    """bf16 for sampling where the hardware runs it natively and training is fp32; else the training dtype."""
    if device.type == "cpu" and train_dtype == torch.float32 and _cpu_has_bf16():
        return torch.bfloat16
    return train_dtype


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
