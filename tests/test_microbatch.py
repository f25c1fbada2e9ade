"""--micro-batch-size and --gradient-checkpointing change memory, never the result.

Each bake runs through the CLI on the tiny model; the trained adapters must agree with an
un-split, un-checkpointed bake of the same settings within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.pair import StudentTeacher

runner = CliRunner()


def bake(model, prompt_files, out: Path, *extra) -> Path:
    system, prompts = prompt_files
    args = ["distill", "--model", str(model), "--prompt", str(system), "--prompts", str(prompts), "--out", str(out),
            "--steps", "3", "--batch-size", "4", "--max-new-tokens", "8", "--holdout", "0.3", "--no-eval",
            "--chunk-size", "5", *map(str, extra)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_files, tmp_path_factory) -> Path:
    return bake(tiny_model, prompt_files, tmp_path_factory.mktemp("ref") / "baked", "--gradient-checkpointing", "off")


@pytest.mark.parametrize("extra, passes_per_step", [
    (("--micro-batch-size", "1"), 4),
    (("--micro-batch-size", "3"), 2),  # uneven parts (3 + 1): the loss is still the whole batch's token-mean
    (("--gradient-checkpointing", "on"), 1),
    (("--gradient-checkpointing", "on", "--micro-batch-size", "2"), 2),
])
def test_same_adapter_as_the_whole_batch(tiny_model, prompt_files, reference, tmp_path, monkeypatch, extra,
                                         passes_per_step):
    calls = []
    original = StudentTeacher.student_states
    monkeypatch.setattr(StudentTeacher, "student_states",
                        lambda self, ro: calls.append(len(ro.responses)) or original(self, ro))
    out = bake(tiny_model, prompt_files, tmp_path / "baked", *extra)
    assert len(calls) == 3 * passes_per_step and sum(calls) == 3 * 4  # really split, every rollout once
    want, got = adapter(reference), adapter(out)
    assert max(v.abs().max().item() for k, v in want.items() if "lora_B" in k) > 1e-4  # B starts at 0: it moved
    assert max_diff(want, got) < 1e-5
    kl = [json.loads(line)["kl"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_kl = [json.loads(line)["kl"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert kl == pytest.approx(ref_kl, abs=1e-5)


@pytest.mark.parametrize("on", [False, True])
def test_checkpointing_recomputes_the_layers_in_the_backward(tiny_dir, on):
    """On, each decoder layer runs again during the student's backward; the teacher pass (eval
    mode, no gradient) runs once either way."""
    import torch

    import tiny

    pair = tiny.load_pair(tiny_dir, "You are a pirate.", gradient_checkpointing=on)
    ro = pair.rollout([[{"role": "user", "content": "Say hello."}]], torch.Generator().manual_seed(0))
    calls = []
    # A module inside the layer (transformers checkpoints the layer's forward, the layer's own hooks stay
    # outside), and a pre-hook: the recompute stops once the last saved tensor is back, before mlp returns.
    pair.student.get_base_model().model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    pair.teacher_states(ro)
    assert len(calls) == 1
    calls.clear()
    pair.student_states(ro).sum().backward()
    assert len(calls) == (2 if on else 1)


@pytest.mark.parametrize("value, message", [
    ("0", "--micro-batch-size must be between 1 and --batch-size (4); got 0."),
    ("5", "--micro-batch-size must be between 1 and --batch-size (4); got 5."),
])
def test_bad_micro_batch_size_is_one_line(tiny_dir, prompt_files, tmp_path, value, message):
    system, prompts = prompt_files
    out = tmp_path / "baked"
    result = runner.invoke(app, ["distill", "--model", str(tiny_dir), "--prompt", str(system), "--out", str(out),
                                 "--batch-size", "4", "--micro-batch-size", value])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in result.stderr.replace("\n", " "), result.stderr
    assert not out.exists()
