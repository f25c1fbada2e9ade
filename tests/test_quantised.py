"""Training on a 4-bit base on CPU: the LoRA gradients are those of the dequantised weights."""

import pytest
import torch

import tiny
from promptbake.setup import add_lora
from promptbake.config import DistillConfig
from promptbake.methods import OPCD
from promptbake.models import load_model, load_tokenizer, resolve_model
from promptbake.pair import StudentTeacher
from promptbake.render import Renderer

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed for --quant 4bit")

PROMPTS = [[{"role": "user", "content": t}] for t in ("Why is the sky blue?", "Write a poem.", "Hola")]


def _pair(model, tok, quantised: bool) -> StudentTeacher:
    student = add_lora(model, DistillConfig(model="x", prompt="x"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return StudentTeacher(student, Renderer(tok, "You are a pirate."), vocab=model.config.vocab_size,
                          quantised=quantised, max_new_tokens=8, temperature=1.0, top_p=1.0)


def test_4bit_lora_gradients_match_the_dequantised_model_after_a_rollout(tmp_path):
    """A rollout and a teacher pass (no-grad, eval mode) come first, as in a bake: on CPUs with
    AVX512-BF16 that is when bitsandbytes would repack the weights into its inference-only layout."""
    src = resolve_model(str(tiny.save_tiny(tmp_path / "m", hidden_size=128, intermediate_size=256)))
    tok = load_tokenizer(src)
    cpu = torch.device("cpu")
    q = load_model(src, quant="4bit", device=cpu, dtype=torch.float32)
    f = load_model(src, quant="none", device=cpu, dtype=torch.float32)
    with torch.no_grad():  # the same weights, dequantised, in plain linear layers
        for mq, mf in zip(q.modules(), f.modules()):
            if isinstance(mq, bnb.nn.Linear4bit):
                mf.weight.copy_(bnb.functional.dequantize_4bit(mq.weight.data, mq.weight.quant_state).float())
    grads = {}
    for name, model, quantised in (("4bit", q, True), ("dequantised", f, False)):
        pair = _pair(model, tok, quantised)
        ro = pair.rollout(PROMPTS, torch.Generator().manual_seed(0))
        if name == "4bit":
            fixed = ro
        OPCD(pair).backward(fixed, pair.teacher_states(fixed))
        grads[name] = {n: p.grad for n, p in pair.student.named_parameters() if p.grad is not None}
    assert grads["4bit"].keys() == grads["dequantised"].keys() and grads["4bit"]
    for n, want in grads["dequantised"].items():
        err = ((grads["4bit"][n] - want).norm() / want.norm()).item()
        assert err < 1e-3, (n, err)
