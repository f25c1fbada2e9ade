"""LeanDecoder computes what the Hugging Face forward computes, for every architecture it claims."""

import pytest
import torch

import tiny
from promptbake.setup import add_lora
from promptbake.config import DistillConfig
from promptbake.decoder import LeanDecoder, can_pack, unsupported_reason, unwrap
from promptbake.sampling import RolloutModel, left_pad, sample, sample_with_generate

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]  # ragged: left padding matters


def _model(kind: str, attn_implementation: str | None = None, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "tiny-gemma3":  # tests/tiny.py's Gemma 3, norms already random
        return tiny.build_gemma3_model(SMALL["vocab_size"], attn_implementation=attn_implementation, **over)
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **{**SMALL, **over})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1 (Gemma: 0 in 1 + w): make both count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.normal_(1, 0.2)
    return model


def _hf_last_logits(model, rows: list[list[int]]) -> torch.Tensor:
    ids, mask = left_pad(rows, 0, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]


CASES = {
    "llama": dict(kind="llama"),
    "llama, tied embeddings, biases": dict(kind="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2 (qkv bias)": dict(kind="qwen2"),
    "qwen3 (q/k norm, head_dim != hidden / heads)": dict(kind="qwen3", head_dim=24),
    "mistral, no window": dict(kind="mistral", sliding_window=None),
    "llama3 rope scaling": dict(kind="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Sliding windows shorter than the 13-token sequences below, so the window changes the logits.
    "mistral, window 4": dict(kind="mistral", sliding_window=4),
    "qwen2, window 3 on layer 2": dict(kind="qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma3 (window 4, local/global rope, q/k norm, 1 KV head)": dict(kind="tiny-gemma3", sliding_window=4),
    # HF's Gemma 3 attention ignores attn_logit_softcapping; the decoder must too, and cap the logits.
    "gemma3, soft-capped logits": dict(kind="tiny-gemma3", sliding_window=4, attn_implementation="eager",
                                                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma2 (window 4, soft-capping)": dict(kind="gemma2", sliding_window=4, head_dim=24, query_pre_attn_scalar=20,
                                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                            attn_implementation="eager"),
    "gemma (scaled embeddings, GeGLU, 1 + w norms)": dict(kind="gemma", head_dim=24),
}


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prefill_and_steps_match_hf_forward(case, pack):
    over = dict(CASES[case])
    model = _model(over.pop("kind"), **over)
    assert unsupported_reason(model) is None
    decoder = LeanDecoder(model, torch.float32, pack=pack)
    assert all((linear.packed is not None) == (pack and can_pack(torch.float32, torch.device("cpu")))
               for linear in decoder.linears())
    rows = [list(p) for p in PROMPTS]
    ids, mask = left_pad(rows, 0, "cpu")
    got = decoder.start(ids, mask, max_new_tokens=6)
    for step in range(6):
        want = _hf_last_logits(model, rows)
        assert (got - want).abs().max() < 1e-4, (case, step)
        nxt = want.argmax(-1)
        for r, t in zip(rows, nxt.tolist()):
            r.append(t)
        if step < 5:
            got = decoder.step(nxt)


@torch.no_grad()
def test_the_sliding_window_is_what_makes_gemma3_match():
    """A decoder that ignored the window would fail the test above: with the window the logits differ."""
    windowed, wide = _model("tiny-gemma3", sliding_window=4), _model("tiny-gemma3", sliding_window=64)
    ids, mask = left_pad(PROMPTS[:1] * 2, 0, "cpu")
    a, b = LeanDecoder(windowed, torch.float32), LeanDecoder(wide, torch.float32)
    la, lb = a.start(ids, mask, 4), b.start(ids, mask, 4)
    assert (la - lb).abs().max() > 1e-3  # the prompt (7 tokens) is longer than the window
    for _ in range(3):
        tok = la.argmax(-1)
        la, lb = a.step(tok), b.step(tok)
        assert (la - lb).abs().max() > 1e-3


def test_unsupported_models_fall_back_to_the_hf_copy_with_a_reason():
    from peft import LoraConfig, get_peft_model

    model = _model("phi")
    assert unsupported_reason(model) == "architecture 'phi'"
    assert unsupported_reason(_model("tiny-gemma3", use_bidirectional_attention=True)) == "bidirectional attention"
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    ro = RolloutModel(peft, torch.float32)
    assert ro.reason == "architecture 'phi'" and not isinstance(ro.model, LeanDecoder)
    kw = dict(max_new_tokens=8, temperature=0.0, top_p=1.0, eos_ids=[-1], pad_id=0)
    g = torch.Generator().manual_seed(0)
    assert sample(ro.model, PROMPTS, generator=g, **kw) == sample_with_generate(peft, PROMPTS, generator=g, **kw)


@pytest.mark.parametrize("kind", ["llama", "tiny-gemma3"])
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,lm_head"])
@torch.no_grad()
def test_refresh_writes_merged_lora_into_the_fused_weights(targets, kind):
    """After the adapter moves, the lean copy's logits are the PEFT model's, on tied embeddings too."""
    model = _model(kind, tie_word_embeddings=True)
    student = add_lora(model, DistillConfig(model="x", prompt="x", lora_targets=targets, lora_rank=4))
    ro = RolloutModel(student, torch.float32)
    assert ro.reason is None and isinstance(ro.model, LeanDecoder)
    for p in (p for n, p in student.named_parameters() if "lora_B" in n):
        p.normal_(0, 0.1)  # B starts at zero: move it so the merge is non-trivial
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    before = ro.model.start(ids, mask, 1)
    ro.refresh()
    after = ro.model.start(ids, mask, 1)
    want = student(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert (after - want).abs().max() < 1e-4
    assert (before - want).abs().max() > 1e-2  # the refresh is what made them agree


@pytest.mark.parametrize("window", [4, 64])
def test_gemma3_greedy_tokens_equal_hf_generate(window):
    """Through RolloutModel with LoRA, past the window: the tokens HF generate picks on the PEFT model."""
    model = _model("tiny-gemma3", sliding_window=window)
    student = add_lora(model, DistillConfig(model="x", prompt="x", lora_rank=4))
    with torch.no_grad():
        for p in (p for n, p in student.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.1)
    ro = RolloutModel(student, torch.float32)
    assert ro.reason is None and isinstance(ro.model, LeanDecoder)
    kw = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, eos_ids=[-1], pad_id=0)
    g = torch.Generator().manual_seed(0)
    assert sample(ro.model, PROMPTS, generator=g, **kw) == sample_with_generate(student, PROMPTS, generator=g, **kw)


def test_bf16_copy_samples_the_same_greedy_tokens_as_fp32(tiny_dir):
    pair = tiny.load_pair(tiny_dir, "x", lora_init_std=0.05)
    ids = [pair.renderer.student_ids([{"role": "user", "content": t}]) for t in ("Why is the sky blue?", "Hola")]
    kw = dict(pair.sampling.kwargs(), max_new_tokens=8, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    fp32 = sample(RolloutModel(pair.student, torch.float32).model, ids, generator=g, **kw)
    bf16 = sample(RolloutModel(pair.student, torch.bfloat16).model, ids, generator=g, **kw)
    agree = sum(a == b for x, y in zip(fp32, bf16) for a, b in zip(x, y)) / sum(map(len, fp32))
    assert agree >= 0.75, (fp32, bf16)  # bf16 may flip a near-tie; it must not produce a different model


def test_packing_is_probed_and_refused_where_the_kernel_is_missing():
    """On this CPU build oneDNN packs fp32; a dtype it can't pack (or a non-CPU device) falls back to plain."""
    import torch.backends.mkldnn

    if torch.backends.mkldnn.is_available():
        assert can_pack(torch.float32, torch.device("cpu"))
    assert not can_pack(torch.float32, torch.device("meta"))
    model = _model("llama")
    decoder = LeanDecoder(model, torch.float32, pack=False)
    head = decoder.head
    assert head.packed is None and head.weight.data_ptr() == model.lm_head.weight.data_ptr()  # read, not copied
    assert decoder.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_frozen_head_is_packed_once_and_shared_by_the_sampler_and_the_loss():
    """head_linear: F.linear's values and input gradient; one packed copy for every reader; repacked if written."""
    from promptbake.decoder import head_linear, shared_pack
    from promptbake.scoring import logits_fn

    if not can_pack(torch.float32, torch.device("cpu")):
        pytest.skip("this torch build has no oneDNN fp32 kernel")
    model = _model("llama", tie_word_embeddings=False)
    student = add_lora(model, DistillConfig(model="x", prompt="x", lora_rank=4))
    base = student.get_base_model()
    weight = base.lm_head.weight
    assert not weight.requires_grad
    x = torch.randn(5, weight.shape[1], requires_grad=True)
    got = head_linear(x, weight)
    want_x = x.detach().clone().requires_grad_(True)
    want = torch.nn.functional.linear(want_x, weight)
    assert (got - want).abs().max() < 1e-5
    g = torch.randn_like(got)
    got.backward(g), want.backward(g)
    assert (x.grad - want_x.grad).abs().max() < 1e-5

    ro = RolloutModel(student, torch.float32)
    assert ro.model.head.packed is shared_pack(weight)  # the sampler's head is the loss's
    fn = logits_fn(base, weight.shape[0])
    with torch.no_grad():
        before = fn(x.detach())
        weight.mul_(2.0)  # written in place: the shared copy must not go stale
        after = fn(x.detach())
    assert (after - 2 * before).abs().max() < 1e-4
