"""Student rollouts: sample responses to a batch of prompts.

Two samplers with the same semantics (softmax of logits / temperature, optional
nucleus filter, stop at EOS):

- `sample` is promptbake's own decode loop: one forward per new token on a KV
  cache, no logits processors, and it ends as soon as every row has emitted EOS.
  Run on a `RolloutModel` it uses plain weights with the adapter folded in.
- `sample_with_generate` calls Hugging Face `generate`, for debugging and as the
  benchmark's baseline.

Both return each row's response token ids, cut after the first EOS (kept).
"""

from __future__ import annotations

import torch


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
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is an exact draw from p, and
    # much cheaper on CPU than torch.multinomial over a large vocabulary.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


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
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)  # (B, L)
    B = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
    next_pos = positions[:, -1:] + 1  # (B, 1)
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    for step in range(max_new_tokens):
        tok = pick_tokens(logits[:, -1, :], temperature, top_p, generator)  # (B,)
        tok = tok.masked_fill(done, pad_id)
        new.append(tok)
        done |= torch.isin(tok, eos)
        if step == max_new_tokens - 1 or bool(done.all()):  # one host sync per token
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = model(tok[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True).logits
        next_pos = next_pos + 1
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

    Each refresh writes W + scale * B @ A into the copy's weights, so sampling runs on
    ordinary linear layers: no per-layer adapter work at every decoded token. The copy
    may use a cheaper dtype than training (bf16 on CPUs with native bf16, as RL
    frameworks sample with vLLM in bf16); the loss is still computed by the training
    weights at full precision, on exactly the tokens sampled here.
    """

    def __init__(self, peft_model, dtype):
        import copy

        from peft.tuners.lora import LoraLayer

        base = peft_model.get_base_model()
        plain = copy.deepcopy(peft_model).merge_and_unload()  # same modules, LoRA wrappers removed
        self.model = plain.to(dtype).eval().requires_grad_(False)
        self.targets = [
            (module, self.model.get_submodule(name))
            for name, module in base.named_modules()
            if isinstance(module, LoraLayer)
        ]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        for lora, linear in self.targets:
            weight = lora.get_base_layer().weight
            delta = sum(lora.get_delta_weight(name) for name in lora.active_adapters)
            linear.weight.copy_(weight + delta)


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
