"""--lr-schedule: constant is --lr at every step; cosine warms up over a tenth of --steps, then decays to a
tenth of --lr. The rate is a pure function of the step (resume exactness: tests/test_resume.py)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.train import lr_at

runner = CliRunner()


def cosine(steps: int, lr: float = 1.0) -> list[float]:
    return [lr_at(s, steps, lr, "cosine") for s in range(1, steps + 1)]


def test_constant_is_the_lr_at_every_step():
    assert [lr_at(s, 7, 3e-4, "constant") for s in range(1, 8)] == [3e-4] * 7


@pytest.mark.parametrize("steps, warmup", [(2, 1), (5, 1), (14, 1), (15, 2), (30, 3), (101, 10)])
def test_cosine_warms_up_then_decays_to_a_tenth(steps, warmup):
    lrs = cosine(steps, 2e-3)
    assert lrs[:warmup] == pytest.approx([2e-3 * s / warmup for s in range(1, warmup + 1)])  # step 1 already learns
    assert lrs[warmup - 1] == 2e-3  # the peak is --lr, at the last warm-up step
    decay = lrs[warmup - 1:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lrs[-1] == pytest.approx(2e-4) and min(lrs) == lrs[-1]  # ends at a tenth, never 0


def test_cosine_is_halfway_at_the_middle_of_the_decay():
    # 22 steps: warm-up 2, then 20 steps of decay; step 12 is halfway: 0.1 + 0.9 * 0.5 = 0.55.
    assert lr_at(12, 22, 1.0, "cosine") == pytest.approx(0.55)
    assert lr_at(7, 22, 1.0, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_one_step_gets_the_whole_lr():
    assert lr_at(1, 1, 5e-4, "cosine") == 5e-4


def test_unknown_schedule_is_one_line(tiny_dir, prompt_files, tmp_path):
    system, _ = prompt_files
    out = tmp_path / "baked"
    result = runner.invoke(app, ["distill", "--model", str(tiny_dir), "--prompt", str(system), "--out", str(out),
                                 "--lr-schedule", "linear"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "--lr-schedule" in result.stderr and "'constant', 'cosine'" in result.stderr, result.stderr
    assert not out.exists()
