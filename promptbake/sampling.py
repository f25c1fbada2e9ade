"""Student rollouts: sample responses to a batch of prompts.

Two samplers with the same semantics (softmax of logits / temperature, optional
nucleus filter, stop at EOS):

- `sample` is promptbake's own decode loop: one forward per new token on a KV
  cache, no logits processors, and it ends as soon as every row has emitted EOS.
  Called inside `merged_lora` it runs on plain weights with the adapter folded in.
- `sample_with_generate` calls Hugging Face `generate`, for debugging and as the
  benchmark's baseline.

Both return each row's response token ids, cut after the first EOS (kept).
"""

from __future__ import annotations

from contextlib import contextmanager

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
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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


@contextmanager
def merged_lora(peft_model, quantised: bool):
    """Sample from plain weights W + scale * B @ A, then put the original W back untouched.

    The merged weights are new tensors, so the frozen base (which is also the teacher)
    is restored bit for bit; merging in place and subtracting again would drift.
    Quantised bases can't hold a merged weight: they keep the LoRA path.
    """
    from peft.tuners.lora import LoraLayer

    if quantised:
        yield
        return
    swapped = []
    try:
        with torch.no_grad():
            for module in peft_model.modules():
                if isinstance(module, LoraLayer) and module.active_adapters:
                    base = module.get_base_layer()
                    delta = sum(module.get_delta_weight(name) for name in module.active_adapters)
                    swapped.append((base, base.weight))
                    base.weight = torch.nn.Parameter(base.weight + delta, requires_grad=False)
        with peft_model.disable_adapter():
            yield
    finally:
        for base, weight in swapped:
            base.weight = weight
