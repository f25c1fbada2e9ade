"""Forward passes that score sampled responses: final hidden states at the positions
that predict each response token, for the student (no system prompt) and the teacher
(with it, optionally continuing from a cached system-prompt prefix).

Everything returns (N, H) hidden states with N = total response tokens of the batch,
rows in the same token order for student and teacher; the LM head is applied later,
in chunks, by `losses.chunked_reverse_kl`.
"""

from __future__ import annotations

import torch


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the right (real tokens never attend to padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def predicting_positions(prompt_lens: list[int], response_lens: list[int], width: int, device) -> torch.Tensor:
    """(B, width) bool: True at positions whose output predicts a response token.

    Response token j of row i sits at prompt_lens[i] + j and is predicted by the position before it.
    """
    pos = torch.arange(width, device=device)[None, :]
    start = torch.tensor(prompt_lens, device=device)[:, None] - 1
    end = start + torch.tensor(response_lens, device=device)[:, None]
    return (pos >= start) & (pos < end)


def logits_fn(causal_lm, vocab: int):
    """(n, H) final hidden states -> (n, vocab) logits, as the model's own forward would compute them."""
    head = causal_lm.get_output_embeddings()
    text_config = causal_lm.config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    cap = getattr(text_config, "final_logit_softcapping", None)

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        if scale:
            logits = logits * scale
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits[..., :vocab]

    return fn


def response_hidden(causal_lm, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """Run the decoder on prompt + response rows; return (N, H) hidden states predicting the responses."""
    device = causal_lm.device
    ids, mask = right_pad([p + r for p, r in zip(prompts, responses)], pad_id, device)  # (B, T)
    hidden = causal_lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    pred = predicting_positions([len(p) for p in prompts], [len(r) for r in responses], ids.shape[1], device)
    return hidden[pred]  # (N, H)


class PrefixCache:
    """The teacher's KV cache for the system-prompt prefix, computed once and reused every step.

    Holds only when every teacher input starts with exactly these prefix token ids,
    which `covers` checks row by row; otherwise the caller does full passes.
    """

    def __init__(self, causal_lm, prefix: list[int]):
        from transformers import DynamicCache

        self.prefix = prefix
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if len(prefix) < 2:
            return
        cache = DynamicCache(config=causal_lm.config)
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            return  # a sliding window would evict the prefix: full passes only
        ids = torch.tensor([prefix], device=causal_lm.device)
        with torch.no_grad():
            causal_lm.get_decoder()(input_ids=ids, cache=cache, use_cache=True)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    @property
    def usable(self) -> bool:
        return bool(self.layers)

    def covers(self, teacher_prompts: list[list[int]]) -> bool:
        P = len(self.prefix)
        return self.usable and all(len(t) > P and t[:P] == self.prefix for t in teacher_prompts)

    def expand(self, batch: int, config):
        """A fresh cache holding the prefix for `batch` rows (no copy: `expand` views)."""
        from transformers import DynamicCache

        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(ddp_cache_data=data, config=config)


@torch.no_grad()
def teacher_hidden(
    causal_lm, teacher_prompts: list[list[int]], responses: list[list[int]], pad_id: int, prefix: PrefixCache | None
) -> torch.Tensor:
    """(N, H) teacher hidden states, continuing from the cached prefix when every row starts with it."""
    if prefix is None or not prefix.covers(teacher_prompts):
        return response_hidden(causal_lm, teacher_prompts, responses, pad_id)
    P = len(prefix.prefix)
    device = causal_lm.device
    suffixes = [t[P:] for t in teacher_prompts]
    ids, mask = right_pad([s + r for s, r in zip(suffixes, responses)], pad_id, device)  # (B, T)
    B, T = ids.shape
    full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)  # (B, P + T)
    positions = torch.arange(P, P + T, device=device)[None, :].expand(B, -1)
    cache = prefix.expand(B, causal_lm.config)
    hidden = causal_lm.get_decoder()(
        input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    pred = predicting_positions([len(s) for s in suffixes], [len(r) for r in responses], T, device)
    return hidden[pred]
