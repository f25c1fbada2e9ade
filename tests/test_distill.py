"""A short bake on the tiny model, end to end through the CLI."""

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from conftest import PIRATE
from promptbake.cli import app

runner = CliRunner()


def bake(tiny_dir, sys_prompt, prompt_set, out, *extra):
    args = ["distill", "--model", str(tiny_dir), "--prompt", str(sys_prompt), "--prompts", str(prompt_set),
            "--out", str(out), "--steps", "8", "--batch-size", "4", "--max-new-tokens", "12", "--lr", "3e-3",
            *extra]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def baked(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bake")
    sys_prompt = tmp / "sys.txt"
    sys_prompt.write_text(PIRATE)
    prompt_set = tmp / "p.txt"
    prompt_set.write_text("\n".join(tiny.CORPUS + [f"Tell me fact number {i} about the sea." for i in range(12)]))
    out = tmp / "baked"
    result = bake(tiny_dir, sys_prompt, prompt_set, out)
    assert result.exit_code == 0, result.output
    return out, result


def test_heldout_kl_falls(baked):
    out, _ = baked
    r = json.loads((out / "promptbake.json").read_text())["results"]
    assert r["heldout_kl_after"] < r["heldout_kl_before"]


def test_output_folder_contents(baked):
    out, result = baked
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "promptbake.json", "metrics.jsonl", "README.md",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "promptbake.json").read_text())
    assert record["system_prompt_sha256"] == hashlib.sha256(PIRATE.encode()).hexdigest()
    assert record["settings"]["steps"] == 8 and record["resolved"]["quant"] == "none"
    assert record["resolved"]["prefix_reuse"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["response_tokens"] > 0 and r["kl"] >= 0 for r in rows)
    assert not list(out.parent.glob(".baked.partial-*"))  # the staging folder was moved, not copied
    assert "held-out KL/token before" in result.output and str(out) in result.output.replace("\n", "")


def test_merged_checkpoint_equals_adapter_on_base(baked, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = baked
    merged = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the template travels with the checkpoint
    text = tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        a, b = merged(ids).logits, with_adapter(ids).logits
        with with_adapter.disable_adapter():
            c = with_adapter(ids).logits  # the base alone
    assert torch.allclose(a, b, atol=1e-4)
    assert (a - c).abs().max() > 1e-4  # training changed something


def test_template_without_system_role_gets_a_notice(tiny_nosystem_dir, sys_prompt, prompt_set, tmp_path):
    result = bake(tiny_nosystem_dir, sys_prompt, prompt_set, tmp_path / "out", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert "the chat template has no system role" in result.output


def test_separate_teacher_with_same_tokenizer(tiny_dir, sys_prompt, prompt_set, tmp_path):
    teacher = tiny.save_tiny(tmp_path / "teacher", seed=7, num_hidden_layers=3)
    result = bake(tiny_dir, sys_prompt, prompt_set, tmp_path / "out", "--steps", "2", "--teacher", str(teacher))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "promptbake.json").read_text())
    assert record["teacher_model"] == str(teacher)


def test_overwrite_replaces_previous_output(tiny_dir, sys_prompt, prompt_set, tmp_path):
    # A finished bake is replaced whole; a folder holding anything else is refused (tests/test_cli_safety.py).
    out = tmp_path / "out"
    assert bake(tiny_dir, sys_prompt, prompt_set, out, "--steps", "1").exit_code == 0
    result = bake(tiny_dir, sys_prompt, prompt_set, out, "--steps", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "prompts.txt", "sys.txt"]


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantised_training_merges_into_full_precision(tiny_dir, sys_prompt, prompt_set, tmp_path, quant):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    out = tmp_path / "out"
    result = bake(tiny_dir, sys_prompt, prompt_set, out, "--steps", "1", "--quant", quant)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into the unquantised base
    assert json.loads((out / "promptbake.json").read_text())["resolved"]["quant"] == quant


def test_heldout_measurement_is_capped_and_reports_its_precision(tiny_dir, sys_prompt, prompt_set, tmp_path):
    out = tmp_path / "capped"
    r = runner.invoke(app, ["distill", "--model", str(tiny_dir), "--prompt", str(sys_prompt), "--out", str(out),
                            "--prompts", str(prompt_set), "--holdout", "0.4", "--heldout-prompts", "3", "--steps", "1",
                            "--batch-size", "2", "--max-new-tokens", "6", "--no-eval"])
    assert r.exit_code == 0, r.output
    held = json.loads((out / "promptbake.json").read_text())["results"]["heldout"]
    assert held["prompts"] == 3  # of the 8 held out
    assert held["stderr_before"] > 0 and held["seconds"] >= 0  # seconds, rounded: a tiny measurement can round to 0.0
    assert "(3 prompts, " in r.stderr


def test_per_token_mean_and_its_standard_error():
    from promptbake.eval.report import per_token_mean

    # Three prompts: per-token KL 0.1 on 10 tokens, 0.3 on 10, 0.2 on 20 -> mean 8 / 40 = 0.2.
    mean, se = per_token_mean([1.0, 3.0, 4.0], [10, 10, 20])
    assert mean == pytest.approx(0.2)
    # Residuals s - mean * c: -1, 1, 0 -> var 1; se = sqrt(3 * 1) / 40.
    assert se == pytest.approx(3 ** 0.5 / 40)
    assert per_token_mean([], []) == (0.0, 0.0)


def test_record_counts_the_prefix_tokens_the_teacher_reused(baked):
    out, result = baked
    record = json.loads((out / "promptbake.json").read_text())
    assert record["resolved"]["prefix_tokens_reused"] > 0  # ChatML: "<|im_start|>system\n" + the prompt
    assert f"{record['resolved']['prefix_tokens_reused']} tokens reused per prompt" in result.stderr
