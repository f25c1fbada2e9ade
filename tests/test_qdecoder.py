"""QuantDecoder: fast rollouts on a bitsandbytes 4-bit / 8-bit base give the exact path's tokens and logits.

The tiny model is saved and loaded through promptbake's own loader with --quant 4bit / 8bit
(bitsandbytes' CPU backend), LoRA gets non-zero weights, and the fast sampler is compared
with the exact one: promptbake's loop on the PEFT model.
"""

import pytest
import torch

import tiny
from promptbake.config import DistillConfig
from promptbake.models import load_model, load_tokenizer, resolve_model
from promptbake.samplers import LoopSampler, SamplingArgs, make_sampler
from promptbake.sampling import left_pad
from promptbake.setup import add_lora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed for --quant 4bit / 8bit")
from promptbake.qdecoder import QuantDecoder, QuantisedSampler, unsupported_reason  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]  # ragged: left padding matters


@pytest.fixture(scope="module")
def tiny_q_dir(tmp_path_factory):
    # hidden 128: every weight row is whole 4-bit blocks (64), as in real models
    return tiny.save_tiny(tmp_path_factory.mktemp("tinyq") / "m", hidden_size=128, intermediate_size=256)


def _save_mistral_window(folder):
    from transformers import MistralConfig, MistralForCausalLM

    tok = tiny.build_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    MistralForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# The tiny Llama, and the other families LeanDecoder runs, quantised: Gemma 3 (GeGLU, (1 + w) and sandwich norms, q/k norms,
# local/global rope, a sliding window of 4 shorter than the rows) and a sliding-window Mistral.
FAMILIES = {
    "llama": lambda folder: tiny.save_tiny(folder, hidden_size=128, intermediate_size=256),
    "gemma3": lambda folder: tiny.save_tiny_gemma3(folder, hidden_size=128, intermediate_size=256, sliding_window=4),
    "mistral, window 4": _save_mistral_window,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_q_dir(request, tmp_path_factory):
    return FAMILIES[request.param](tmp_path_factory.mktemp("family") / "m")


def _student(folder, quant: str, seed: int = 1):
    src = resolve_model(str(folder))
    torch.manual_seed(0)
    model = load_model(src, quant=quant, device=torch.device("cpu"), dtype=torch.float32)
    student = add_lora(model, DistillConfig(model="x", prompt="x"))
    _randomise_lora(student, seed)
    return student, load_tokenizer(src)


def _randomise_lora(student, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _args(tok, student, temperature=0.0, max_new_tokens=12):
    return SamplingArgs.for_model(tok, student, max_new_tokens=max_new_tokens, temperature=temperature)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_greedy_tokens_equal_the_exact_path(family_q_dir, quant):
    student, tok = _student(family_q_dir, quant)
    assert unsupported_reason(student) is None
    args = _args(tok, student)
    fast = make_sampler("fast", student, args, quantised=True)
    assert isinstance(fast, QuantisedSampler), fast.description
    exact = LoopSampler(student, args)
    want = exact.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert fast.sample(PROMPTS, torch.Generator().manual_seed(0)) == want
    # more than one token per row, so the decode steps were compared, and every row runs past a window of 4
    assert all(len(answer) > 1 and len(prompt) + len(answer) > 4 for prompt, answer in zip(PROMPTS, want))


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_logits_match_the_peft_forward_and_follow_the_adapter(family_q_dir, quant):
    student, _ = _student(family_q_dir, quant)
    decoder = QuantDecoder(student)
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    for seed in (1, 2):  # after changing the adapter (an optimizer step), refresh() picks it up
        _randomise_lora(student, seed)
        decoder.refresh()
        with torch.no_grad():
            want = student(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
            got = decoder.start(ids, mask, max_new_tokens=2)
            step = decoder.step(want[:, -1].argmax(-1))
            full = torch.cat([ids, want[:, -1].argmax(-1, keepdim=True)], 1)
            want_step = student(input_ids=full, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1)).logits[:, -1]
        decoder.release()
        tol = 1e-4 if quant == "4bit" else 5e-2  # 8-bit: activations are quantised per call, row by row
        torch.testing.assert_close(got, want[:, -1], atol=tol, rtol=tol)
        torch.testing.assert_close(step, want_step, atol=tol, rtol=tol)


def test_reads_the_stored_weights_without_a_copy(tiny_q_dir):
    student, _ = _student(tiny_q_dir, "4bit")
    decoder = QuantDecoder(student)
    base = student.get_base_model()
    assert decoder.embed.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert decoder.head.weight.data_ptr() == base.lm_head.weight.data_ptr()
    new = sum(t.numel() for layer in decoder.layers for p in layer.linears for t in (p.A, p.B))
    lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    assert new == pytest.approx(lora, rel=0.5)  # only the LoRA factors (B block-diagonal: a few zeros)
    quantised = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.weight.dtype == torch.uint8 for m in quantised)  # still 4-bit


def test_no_fast_path_says_why_once(tmp_path):
    """An architecture outside the two families (Phi-3: fused q|k|v and gate|up layers) has no lean
    decoder: the exact loop, with the reason in its description."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = tiny.build_tokenizer()
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    Phi3ForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    student, tok = _student(tmp_path / "m", "4bit")
    assert unsupported_reason(student) == "architecture 'phi3'"
    sampler = make_sampler("fast", student, _args(tok, student), quantised=True)
    assert isinstance(sampler, LoopSampler)
    assert sampler.description == "own loop on the PEFT model (no fast quantised path: architecture 'phi3')"
