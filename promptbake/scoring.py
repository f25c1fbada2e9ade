"""Forward passes that score sampled responses: final hidden states at the positions
that predict each response token, for the student (no system prompt) and the teacher
(with it, optionally continuing from a cached system-prompt prefix).

Everything returns (N, H) hidden states with N = total response tokens of the batch,
rows in the same token order for student and teacher; the LM head is applied later,
in chunks, by `losses.chunked_reverse_kl`.
"""

from __future__ import annotations

import torch

from .decoder import head_linear


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

    plain = type(head) is torch.nn.Linear  # not LoRA-wrapped or quantised: its weight is the whole head

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        if plain and hidden.dim() == 2:
            logits = head_linear(hidden, head.weight)
            if head.bias is not None:
                logits = logits + head.bias
        else:
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
    `reason` says why the cache can't be used at all (None when it can), `why_not`
    why it can't serve a given batch, `miss` why the first batch `covers` refused was
    refused (the notice a bake prints), and `length` how many tokens each row reuses.

    Sliding-window layers (Gemma 2/3, Mistral) are reused too, inside and beyond the
    window: the cache keeps every prefix key, and each batch's cache is seeded with all
    of them, so HF's sliding-window cache layer knows the true number of tokens before
    the suffix, keeps the last window - 1 of them and masks by absolute position,
    exactly as a full pass does.
    """

    def __init__(self, causal_lm, prefix: list[int]):
        from transformers import DynamicCache

        self.prefix = prefix
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reason = None
        self.miss: str | None = None
        if len(prefix) < 2:
            self.reason = (f"the teacher's renders of two different prompts share only {len(prefix)} leading "
                           f"token{'' if len(prefix) == 1 else 's'}, so there is no system-prompt prefix to reuse")
            return
        cache = DynamicCache(config=causal_lm.config)
        self.reason = cache_reason(cache, causal_lm.config)
        if self.reason:
            return
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False):
                layer.activate_past_recording()  # keep all P prefix keys, not only the last window - 1
        ids = torch.tensor([prefix], device=causal_lm.device)
        with torch.no_grad():
            causal_lm.get_decoder()(input_ids=ids, cache=cache, use_cache=True)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]  # each (1, nk, P, d)

    @property
    def usable(self) -> bool:
        return bool(self.layers)

    @property
    def length(self) -> int:
        """Tokens per row that the teacher doesn't recompute (0 when the cache is unusable)."""
        return len(self.prefix) if self.usable else 0

    def why_not(self, teacher_prompts: list[list[int]]) -> str | None:
        """Why this batch's teacher inputs can't continue from the cache, in words; None when they can."""
        if not self.usable:
            return self.reason
        P = len(self.prefix)
        for i, t in enumerate(teacher_prompts):
            if t[:P] != self.prefix:
                at = next((j for j, (a, b) in enumerate(zip(t, self.prefix)) if a != b), min(len(t), P))
                return (f"prompt {i + 1}'s teacher input doesn't start with the {P}-token system-prompt prefix "
                        f"(its token ids differ from token {at + 1}: the chat template or the tokenizer renders "
                        f"the system prompt differently for it)")
            if len(t) == P:
                return f"prompt {i + 1}'s teacher input is the {P}-token system-prompt prefix and nothing after it"
        return None

    def covers(self, teacher_prompts: list[list[int]]) -> bool:
        why = self.why_not(teacher_prompts)
        if why is not None and self.miss is None:
            self.miss = why
        return why is None

    def expand(self, batch: int, config):
        """A fresh cache holding the prefix for `batch` rows (no copy: `expand` views)."""
        from transformers import DynamicCache

        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(ddp_cache_data=data, config=config)


def cache_reason(cache, config) -> str | None:
    """Why a saved prefix can't seed this model's cache (None when every layer is a plain or sliding KV cache)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    text = config.get_text_config()
    if getattr(text, "attention_chunk_size", None) or "chunked_attention" in (getattr(text, "layer_types", None) or ()):
        # HF keeps chunked layers in sliding-window caches; continuing one from a saved prefix is untested here.
        return "the model has chunked-attention layers, which promptbake doesn't continue from a saved prefix"
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return f"the model's cache has {type(layer).__name__} layers, which promptbake can't seed with a prefix"
    return None


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
