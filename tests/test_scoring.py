"""Teacher prefix-cache reuse and response-only chunked logits give the same loss and gradients."""

import pytest
import torch

import tiny
from conftest import PIRATE
from promptbake.losses import reverse_kl_loss
from promptbake.methods import OPCD
from promptbake.scoring import PrefixCache, predicting_positions, response_hidden, right_pad, teacher_hidden

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


# --- Sliding-window models (Gemma 3: five layers in six see only the last `window` tokens) ---

def _gemma_pair(tmp_path_factory, window: int, **kw):
    folder = tiny.save_tiny_gemma3(tmp_path_factory.mktemp(f"gemma_w{window}") / "m", sliding_window=window)
    return tiny.load_pair(folder, PIRATE, **kw)


@pytest.mark.parametrize("where", ["all inside the window", "prefix inside, the rest beyond", "prefix beyond"])
def test_prefix_reuse_on_a_sliding_window_model_equals_the_full_pass(tmp_path_factory, where):
    probe = _gemma_pair(tmp_path_factory, 512, prefix_reuse=True)
    P = probe.prefix.length
    assert P > 8  # <bos><start_of_turn>user\n + the system prompt + \n\n
    window = {"all inside the window": 512, "prefix inside, the rest beyond": P + 3, "prefix beyond": 4}[where]
    reuse = _gemma_pair(tmp_path_factory, window, prefix_reuse=True, max_new_tokens=10)
    full = _gemma_pair(tmp_path_factory, window, prefix_reuse=False, max_new_tokens=10)
    assert reuse.prefix.reason is None and reuse.prefix.length == P
    ro = reuse.rollout(PROMPTS, torch.Generator().manual_seed(0))
    assert reuse.prefix.why_not(ro.teacher_ids) is None
    longest = max(len(t) + len(r) for t, r in zip(ro.teacher_ids, ro.responses))
    assert (longest <= window) == (where == "all inside the window")
    with torch.no_grad(), reuse.teacher_weights() as lm:
        cached = teacher_hidden(lm, ro.teacher_ids, ro.responses, reuse.tok.pad_token_id, reuse.prefix)
        plain = response_hidden(lm, ro.teacher_ids, ro.responses, reuse.tok.pad_token_id)
    assert cached.shape == plain.shape == (ro.n_tokens, 64)
    assert (cached - plain).abs().max() < 1e-4
    kl_reuse = reuse.reverse_kl(ro)
    kl_full = full.reverse_kl(ro)
    assert reuse.prefix_misses == 0 and kl_full.abs().max() > 1e-3  # a KL worth comparing
    assert (kl_reuse - kl_full).abs().max() < 1e-4


def test_the_window_changes_the_teacher_so_the_test_above_can_fail(tmp_path_factory):
    narrow, wide = _gemma_pair(tmp_path_factory, 4), _gemma_pair(tmp_path_factory, 512)
    ro = wide.rollout(PROMPTS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = response_hidden(narrow.student.get_base_model(), ro.teacher_ids, ro.responses, 0)
        b = response_hidden(wide.student.get_base_model(), ro.teacher_ids, ro.responses, 0)
    assert (a - b).abs().max() > 1e-2


def test_each_fall_back_names_its_cause(tiny_dir, tmp_path):
    pair = tiny.load_pair(tiny_dir, PIRATE, prefix_reuse=True)
    P = pair.prefix.length
    with pair.teacher_weights() as lm:
        short = PrefixCache(lm, pair.prefix.prefix[:1])
    assert not short.usable and short.length == 0
    assert short.reason == ("the teacher's renders of two different prompts share only 1 leading token, "
                            "so there is no system-prompt prefix to reuse")
    assert short.why_not([pair.prefix.prefix + [5]]) == short.reason

    bare = pair.prefix.prefix
    assert pair.prefix.why_not([bare + [5], bare]) == (
        f"prompt 2's teacher input is the {P}-token system-prompt prefix and nothing after it")
    changed = bare[:3] + [bare[3] + 1] + bare[4:] + [5]
    assert pair.prefix.why_not([bare + [5], changed]) == (
        f"prompt 2's teacher input doesn't start with the {P}-token system-prompt prefix (its token ids differ "
        "from token 4: the chat template or the tokenizer renders the system prompt differently for it)")

    folder = tiny.save_tiny(tmp_path / "m", template=COUNTING)
    counting = tiny.load_pair(folder, PIRATE, prefix_reuse=True)
    multi_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "More?"}]
    ro = counting.rollout([*PROMPTS, multi_turn], torch.Generator().manual_seed(0))
    assert counting.prefix.why_not(ro.teacher_ids).startswith("prompt 4's teacher input doesn't start with")
    counting.teacher_states(ro)
    assert counting.prefix_misses == 1 and counting.prefix.miss == counting.prefix.why_not(ro.teacher_ids)


# Renders the conversation last turn first: the teacher input starts with the user's text, not the system prompt.
REVERSED = ("{% for m in messages|reverse %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_bake_prints_the_real_reason_reuse_is_off(tmp_path, prompt_files):
    from typer.testing import CliRunner

    from promptbake.cli import app

    folder = tiny.save_tiny(tmp_path / "m", template=REVERSED)
    system, prompts = prompt_files
    result = CliRunner().invoke(app, ["distill", "--model", str(folder), "--prompt", str(system), "--prompts",
                                      str(prompts), "--out", str(tmp_path / "out"), "--steps", "1", "--batch-size",
                                      "2", "--max-new-tokens", "4", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert ("note: the teacher runs full passes, without its system-prompt prefix cache, because the teacher's "
            "renders of two different prompts share only 0 leading tokens, so there is no system-prompt prefix "
            "to reuse.") in " ".join(result.output.split())


def test_caches_without_keys_and_values_are_refused_by_name():
    from transformers import AutoConfig, DynamicCache

    from promptbake.scoring import cache_reason

    hybrid = AutoConfig.for_model("qwen3_next", num_hidden_layers=4)
    assert cache_reason(DynamicCache(config=hybrid), hybrid) == (
        "the model's cache has LinearAttentionLayer layers, which promptbake can't seed with a prefix")
    chunked = AutoConfig.for_model("llama4_text", num_hidden_layers=4, attention_chunk_size=8)
    assert cache_reason(DynamicCache(config=chunked), chunked) == (
        "the model has chunked-attention layers, which promptbake doesn't continue from a saved prefix")
    gemma = AutoConfig.for_model("gemma3_text", num_hidden_layers=6)
    assert cache_reason(DynamicCache(config=gemma), gemma) is None
