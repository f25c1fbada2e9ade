"""--teacher-rollouts: OPCD with a share of each batch sampled by the prompted teacher.

The last round(share x batch) rollouts of a step are the teacher's (system prompt in context,
frozen weights), the others the student's; the student learns the reverse KL at all of them,
the resume stays exact, and bad values are one error line."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from conftest import PIRATE, SECRET
from promptbake.methods import OPCD, PhaseTimer
from promptbake.pair import StudentTeacher
from test_methods import distill_args
from test_resume import adapter_diff, bake_args, metrics, run, stop_at, work


def test_the_last_rollouts_of_each_batch_are_the_prompted_teachers(tiny_model, prompt_files, tmp_path, monkeypatch):
    steps, student, teacher, trained = [], [], [], []
    originals = {name: getattr(StudentTeacher, name) for name in ("rollout", "teacher_rollout", "student_states")}

    def recorder(name, into):  # calls made inside a training step (the held-out KL samples too)
        def wrapped(self, *args):
            out = originals[name](self, *args)
            if len(steps) > len(into):
                into.append((args, out))
            return out
        return wrapped

    monkeypatch.setattr(StudentTeacher, "rollout", recorder("rollout", student))
    monkeypatch.setattr(StudentTeacher, "teacher_rollout", recorder("teacher_rollout", teacher))
    monkeypatch.setattr(StudentTeacher, "student_states", recorder("student_states", trained))
    step = OPCD.step
    monkeypatch.setattr(OPCD, "step", lambda self, batch, gen, timer: steps.append(batch) or step(self, batch, gen,
                                                                                                    timer))
    out = tmp_path / "baked"
    result = run(distill_args(tiny_model, prompt_files, out, "--batch-size", "4", "--teacher-rollouts", "0.5",
                              "--no-eval"))
    assert result.exit_code == 0, result.output
    assert len(steps) == len(student) == len(teacher) == len(trained) == 3

    tok = tiny.load_pair(tiny_model, PIRATE).tok
    for batch, ((s_prompts, _), s_ro), ((t_prompts, _), t_ro), ((ro,), _) in zip(steps, student, teacher, trained):
        assert s_prompts == batch[:2] and t_prompts == batch[2:]  # 0.5 of 4: the last two are the teacher's
        assert all(SECRET in tok.decode(ids) for ids in t_ro.teacher_ids)  # sampled with the system prompt
        assert all(SECRET not in tok.decode(ids) for ids in ro.student_ids)  # trained without it
        assert ro.prompts == batch
        assert ro.responses == s_ro.responses + t_ro.responses  # the student trains on exactly those tokens
    assert json.loads((out / "promptbake.json").read_text())["settings"]["teacher_rollouts"] == 0.5
    assert "the teacher sampled 50% of each batch's answers" in " ".join((out / "README.md").read_text().split())


@pytest.mark.parametrize("share, rows", [(0.0, 0), (0.25, 1), (0.5, 2), (0.6, 2), (1.0, 4)])
def test_the_teachers_share_is_rounded_to_whole_rollouts(share, rows):
    assert OPCD(None, teacher_share=share).teacher_rows(4) == rows


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_opcd_with_teacher_rollouts_lowers_the_reverse_kl(tiny_model, share):
    pair = tiny.load_pair(tiny_model, PIRATE, lora_init_std=0.05)  # a student away from the teacher
    batch = [[{"role": "user", "content": p}] for p in ("Say hello.", "What is a fox?", "Count to five.", "Hi.")]
    params = [p for p in pair.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    method = OPCD(pair, teacher_share=share)
    losses = []
    for _ in range(12):
        stats = method.step(batch, torch.Generator().manual_seed(0), PhaseTimer(torch.device("cpu")))
        losses.append(stats.loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(share, [round(x, 4) for x in losses])
    assert losses[-1] < 0.9 * losses[0]


@pytest.fixture(scope="module")
def mixed_reference(tiny_model, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixref") / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--teacher-rollouts", "0.5"))
    assert result.exit_code == 0, result.output
    return out


def test_resume_with_teacher_rollouts_matches_uninterrupted(tiny_model, prompt_files, mixed_reference, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "baked"
    stop_at(monkeypatch, tiny_model, prompt_files, out, 5, "--teacher-rollouts", "0.5")
    refused = run(bake_args(tiny_model, prompt_files, out))  # without the option: another setting
    assert refused.exit_code == 2
    assert "--teacher-rollouts was 0.5, now 0.0" in refused.output

    resumed = run(bake_args(tiny_model, prompt_files, out, "--teacher-rollouts", "0.5"))
    assert resumed.exit_code == 0, resumed.output
    diff = adapter_diff(mixed_reference, out)
    print(f"--teacher-rollouts 0.5: max abs adapter difference after resume {diff:.3g}")
    assert diff <= 1e-6
    assert metrics(out) == metrics(mixed_reference)


@pytest.mark.parametrize("extra, message", [
    (("--teacher-rollouts", "1.5"), "error: --teacher-rollouts must be a share between 0 and 1 (got 1.5)."),
    (("--teacher-rollouts", "-0.1"), "error: --teacher-rollouts must be a share between 0 and 1 (got -0.1)."),
    (("--teacher-rollouts", "nan"), "error: --teacher-rollouts must be a share between 0 and 1 (got nan)."),
    (("--teacher-rollouts", "0.5", "--method", "sft"),
     "error: --teacher-rollouts applies to --method opcd only (--method sft trains on the teacher's samples already)."),
])
def test_bad_teacher_rollouts_is_one_error_line(tiny_model, prompt_files, tmp_path, extra, message):
    out = tmp_path / "baked"
    result = run(distill_args(tiny_model, prompt_files, out, *extra))
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert not out.exists() and not work(out).exists()
