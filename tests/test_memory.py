"""The peak-memory estimate: weights and adapter state as a loaded model holds them, phases that scale right."""

import pytest
import torch

import tiny
from promptbake.config import DistillConfig
from promptbake.memory import GiB, estimate_peak_memory
from promptbake.models import load_model, resolve_model
from promptbake.setup import add_lora

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
BAKE = dict(quant="4bit", dtype="bfloat16", batch_size=8, max_new_tokens=512, prompt_tokens=100)


@pytest.fixture(scope="module")
def tiny_q_dir(tmp_path_factory):
    return tiny.save_tiny(tmp_path_factory.mktemp("tinym") / "m", hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_weights_and_adapter_as_loaded(tiny_q_dir, quant):
    if quant == "4bit":
        pytest.importorskip("bitsandbytes")
    model = load_model(resolve_model(str(tiny_q_dir)), quant=quant, device=torch.device("cpu"), dtype=torch.float32)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # quant states included
    student = add_lora(model, DistillConfig(model="x", prompt="x"))
    lora = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    est = estimate_peak_memory(model.config, quant=quant, dtype="float32", batch_size=2, max_new_tokens=8,
                               prompt_tokens=8)
    in_flight = 0 if quant == "none" else 256 * 128 * 4  # one projection dequantised at a time
    assert est.weights - in_flight == pytest.approx(stored, rel=0.05)
    assert est.adapter == 4 * lora  # weights, gradients, two AdamW moments


def test_checkpointing_and_micro_batches_shrink_only_the_activations():
    off = estimate_peak_memory(LLAMA_8B, **BAKE)
    on = estimate_peak_memory(LLAMA_8B, **BAKE, gradient_checkpointing=True)
    half = estimate_peak_memory(LLAMA_8B, **BAKE, micro_batch_size=4)
    assert on.activations < off.activations / 8
    assert half.activations == pytest.approx(off.activations / 2, rel=0.05)
    for e in (on, half):
        assert (e.weights, e.adapter, e.rollout, e.teacher) == (off.weights, off.adapter, off.rollout, off.teacher)
    assert off.peak == off.resident + off.student  # the student backward is the largest phase


def test_the_paper_setting_on_8b_fits_24_gib_only_with_checkpointing():
    off = estimate_peak_memory(LLAMA_8B, **BAKE)
    assert not off.fits(24 * GiB)
    advice = off.advice(24 * GiB)
    assert advice[0].startswith("--gradient-checkpointing on: peak") and advice[-1].endswith("(fits)")
    on = estimate_peak_memory(LLAMA_8B, **BAKE, gradient_checkpointing=True)
    assert on.fits(24 * GiB) and on.advice(24 * GiB) == []
    assert 4 * GiB < on.weights < 7 * GiB  # 4-bit linears, bf16 embedding and head
    lines = on.lines()
    assert lines[-1].startswith("peak: ") and len(lines) == 7


def test_advice_goes_on_to_settings_that_change_the_bake_when_it_must():
    tight = estimate_peak_memory(LLAMA_8B, **BAKE).advice(6.5 * GiB)
    assert any("--batch-size" in line for line in tight)
    assert all("--batch-size" not in line for line in tight[:3])  # free changes first
