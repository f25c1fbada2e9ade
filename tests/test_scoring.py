"""Teacher prefix-cache reuse and response-only chunked logits give the same loss and gradients."""

import pytest
import torch

import tiny
from conftest import PIRATE
from promptbake.losses import reverse_kl_loss
from promptbake.methods import OPCD
from promptbake.scoring import predicting_positions, right_pad

PROMPTS = [[{"role": "user", "content": t}] for t in ("Why is the sky blue?", "Write a poem about the sea.", "Hola")]

# Writes the conversation's length into the system turn: the rendered system prefix differs per prompt.
COUNTING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'system' %} ({{ messages|length }} messages){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _kl_and_grads(pair, ro):
    pair.student.zero_grad(set_to_none=True)
    kl = OPCD(pair).backward(ro, pair.teacher_states(ro))
    grads = {n: p.grad.clone() for n, p in pair.student.named_parameters() if p.grad is not None}
    return kl, grads


def test_prefix_reuse_gives_same_loss_and_gradients(tiny_dir):
    reuse = tiny.load_pair(tiny_dir, PIRATE, prefix_reuse=True)
    full = tiny.load_pair(tiny_dir, PIRATE, prefix_reuse=False)
    assert reuse.prefix.usable and full.prefix is None
    ro = reuse.rollout(PROMPTS, torch.Generator().manual_seed(0))
    assert reuse.prefix.covers(ro.teacher_ids)
    kl_a, g_a = _kl_and_grads(reuse, ro)
    kl_b, g_b = _kl_and_grads(full, ro)
    assert reuse.prefix_misses == 0
    assert torch.allclose(kl_a, kl_b, atol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        assert torch.allclose(g_a[name], g_b[name], atol=1e-5), name


def test_prefix_fallback_when_system_prompt_is_not_a_shared_prefix(tmp_path):
    folder = tiny.save_tiny(tmp_path / "m", template=COUNTING)
    pair = tiny.load_pair(folder, PIRATE, prefix_reuse=True)
    assert pair.prefix.usable  # the probes (one user turn each) agree on a prefix...
    multi_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "More?"}]
    ro = pair.rollout([*PROMPTS, multi_turn], torch.Generator().manual_seed(0))
    assert not pair.prefix.covers(ro.teacher_ids)  # ...that a longer conversation doesn't start with
    kl_a, _ = _kl_and_grads(pair, ro)
    assert pair.prefix_misses == 1
    full = tiny.load_pair(folder, PIRATE, prefix_reuse=False)
    kl_b, _ = _kl_and_grads(full, ro)
    assert torch.allclose(kl_a, kl_b, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 256])
def test_response_only_chunked_logits_equal_full_logits(tiny_dir, chunk):
    pair = tiny.load_pair(tiny_dir, PIRATE, chunk_size=chunk)
    ro = pair.rollout(PROMPTS, torch.Generator().manual_seed(0))
    kl, grads = _kl_and_grads(pair, ro)

    # Reference: full (B, T, V) logits of both models, aligned on response tokens, masked token-mean.
    base, pad = pair.student.get_base_model(), pair.tok.pad_token_id
    def aligned_logits(model, prompt_ids):
        ids, mask = right_pad([p + r for p, r in zip(prompt_ids, ro.responses)], pad, "cpu")
        pred = predicting_positions([len(p) for p in prompt_ids], [len(r) for r in ro.responses], ids.shape[1], "cpu")
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        B, R = len(ro.responses), max(len(r) for r in ro.responses)
        out = logits.new_zeros(B, R, logits.shape[-1])
        resp_mask = torch.zeros(B, R, dtype=torch.bool)
        for i in range(B):
            rows = logits[i][pred[i]]
            out[i, : len(rows)] = rows
            resp_mask[i, : len(rows)] = True
        return out, resp_mask
    with torch.no_grad(), pair.student.disable_adapter():
        t_logits, mask = aligned_logits(base, ro.teacher_ids)
    pair.student.zero_grad(set_to_none=True)
    s_logits, _ = aligned_logits(base, ro.student_ids)
    loss = reverse_kl_loss(s_logits, t_logits, mask)
    loss.backward()
    assert kl.mean().item() == pytest.approx(loss.item(), abs=1e-6)
    for n, p in pair.student.named_parameters():
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n
