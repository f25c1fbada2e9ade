"""--samples-per-prompt N: each step draws --batch-size / N prompts and samples each N times in a row,
every copy its own answer, for every method; bad values are one line and a non-zero exit."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.methods import METHODS
from promptbake.pair import StudentTeacher

runner = CliRunner()


def bake_args(model, prompt_files, out, *extra) -> list[str]:
    system, prompts = prompt_files
    return ["distill", "--model", str(model), "--prompt", str(system), "--prompts", str(prompts), "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--max-new-tokens", "8", "--holdout", "0.3", "--no-eval",
            *map(str, extra)]


@pytest.mark.parametrize("method", ["opcd", "offpolicy", "sft"])
def test_each_prompt_is_sampled_n_times_with_its_own_answers(tiny_model, prompt_files, tmp_path, monkeypatch, method):
    batches, rollouts = [], []  # what the loop handed the method; (prompts, responses) of every rollout
    step = METHODS[method].step
    monkeypatch.setattr(METHODS[method], "step",
                        lambda self, batch, gen, timer: batches.append(batch) or step(self, batch, gen, timer))
    for name in ("rollout", "teacher_rollout"):  # the student samples for opcd, the prompted teacher otherwise
        def sampled(self, prompts, generator, original=getattr(StudentTeacher, name)):
            ro = original(self, prompts, generator)
            rollouts.append((prompts, ro.responses))
            return ro

        monkeypatch.setattr(StudentTeacher, name, sampled)
    out = tmp_path / "baked"
    result = runner.invoke(app, bake_args(tiny_model, prompt_files, out, "--method", method,
                                          "--samples-per-prompt", 2))
    assert result.exit_code == 0, result.output

    assert len(batches) == 2
    for batch in batches:  # 4 rollouts: 2 prompts, each twice in a row
        assert len(batch) == 4 and batch[0] == batch[1] and batch[2] == batch[3] and batch[0] != batch[2]
    assert len({json.dumps(b[i]) for b in batches for i in (0, 2)}) == 4  # fresh prompts at each step
    trained = [responses for prompts, responses in rollouts if any(prompts is b for b in batches)]
    assert len(trained) == 2
    for responses in trained:  # one generator across the batch: the copies get different samples
        assert len(responses) == 4 and responses[0] != responses[1] and responses[2] != responses[3]

    assert json.loads((out / "promptbake.json").read_text())["settings"]["samples_per_prompt"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "2 steps of 2 prompts x 2 samples" in (out / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (("--samples-per-prompt", 0), "--samples-per-prompt must be at least 1 (got 0)."),
    (("--samples-per-prompt", 3), "--batch-size must be a multiple of --samples-per-prompt: got --batch-size 4 and "
                                  "--samples-per-prompt 3. Try --batch-size 3."),
    (("--samples-per-prompt", 2, "--temperature", 0),
     "--samples-per-prompt 2 needs sampling: with --temperature 0 every copy of a prompt gets the same answer. "
     "Raise --temperature or use --samples-per-prompt 1."),
])
def test_bad_samples_per_prompt_is_one_line(tiny_dir, prompt_files, tmp_path, extra, message):
    system, _ = prompt_files
    out = tmp_path / "baked"
    result = runner.invoke(app, ["distill", "--model", str(tiny_dir), "--prompt", str(system), "--out", str(out),
                                 "--batch-size", "4", *map(str, extra)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"error: {message}" in result.stderr.replace("\n", " "), result.stderr
    assert not out.exists()
