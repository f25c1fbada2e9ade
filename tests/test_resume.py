"""Stopping a bake at any point and resuming it gives the same result; faults leave everything usable.

Faults are injected through promptbake's own functions (never transformers): a signal sent to
ourselves from inside a step, a raw KeyboardInterrupt, a NaN loss, an out-of-memory error, a
full disk while the output is written.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake.checkpoint import Training
from promptbake.cli import app
from promptbake.pair import StudentTeacher
from promptbake.train import lr_at

STEPS = 8
TIMING = {"tokens_per_s", "rollout_s", "teacher_s", "student_s", "optim_s", "step_s"}


def bake_args(model, prompt_files, out, *extra, steps=STEPS, save_every=2) -> list[str]:
    system, prompts = prompt_files
    return ["distill", "--model", str(model), "--prompt", str(system), "--prompts", str(prompts), "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--max-new-tokens", "8", "--holdout", "0.3",
            "--save-every", str(save_every), *extra]


def run(args):
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x = load_file(a / "adapter" / "adapter_model.safetensors")
    y = load_file(b / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def work(out: Path) -> Path:
    return out.parent / f"{out.name}.work"


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in work(out).glob("step-*.pt"))


@pytest.fixture(scope="module")
def reference(tiny_model, prompt_files, tmp_path_factory) -> Path:
    """An uninterrupted bake to compare every resumed one with."""
    out = tmp_path_factory.mktemp("ref") / "baked"
    result = run(bake_args(tiny_model, prompt_files, out))
    assert result.exit_code == 0, result.output
    assert not work(out).exists()  # removed once the output is complete
    return out


def at_train_step(monkeypatch, k: int, action) -> None:
    """Call action() at the start of the k-th training student pass (step k of this process)."""
    original = StudentTeacher.student_states
    calls = {"n": 0}

    def wrapped(self, ro):
        calls["n"] += 1
        if calls["n"] == k:
            action()
        return original(self, ro)

    monkeypatch.setattr(StudentTeacher, "student_states", wrapped)


def send(signum):
    return lambda: os.kill(os.getpid(), signum)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


# (how, at step k, expected exit code, step of the checkpoint the stop leaves)
STOPS = [
    ("SIGINT", 1, 130, None),  # before any step finished: nothing to save, the next run starts over
    ("SIGTERM", 3, 143, 2),
    ("raw KeyboardInterrupt", 5, 130, 4),
    ("SIGINT", 6, 130, 5),  # between --save-every checkpoints: the stop saves step 5 itself
    ("SIGINT", STEPS, 130, STEPS - 1),
]


@pytest.mark.parametrize("how,k,code,saved", STOPS, ids=[f"{s[0]}@{s[1]}" for s in STOPS])
def test_stop_inside_a_step_then_resume_matches_uninterrupted(tiny_model, prompt_files, reference, tmp_path,
                                                                monkeypatch, how, k, code, saved):
    out = tmp_path / "baked"
    action = {"SIGINT": send(signal.SIGINT), "SIGTERM": send(signal.SIGTERM),
              "raw KeyboardInterrupt": raise_keyboard_interrupt}[how]
    with monkeypatch.context() as m:
        at_train_step(m, k, action)
        stopped = run(bake_args(tiny_model, prompt_files, out))
    assert stopped.exit_code == code, stopped.output
    assert "interrupted:" in stopped.output and not out.exists()
    if saved:
        assert f"saved step {saved} in {work(out)}" in stopped.output
        assert f"continue from step {saved + 1}" in stopped.output
        assert checkpoints(out)[-1] == f"step-{saved:06d}.pt"
    else:
        assert "no step had finished" in stopped.output and checkpoints(out) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resumed = run(bake_args(tiny_model, prompt_files, out))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming the stopped bake kept in {work(out)}" in resumed.output
    diff = adapter_diff(reference, out)
    print(f"{how} at step {k}: max abs adapter difference after resume {diff:.3g}")
    assert diff <= 1e-6
    assert metrics(out) == metrics(reference)
    ref_results = json.loads((reference / "promptbake.json").read_text())["results"]
    results = json.loads((out / "promptbake.json").read_text())["results"]
    assert results["heldout_kl_before"] == ref_results["heldout_kl_before"]  # kept, not re-measured
    assert results["heldout_kl_after"] == ref_results["heldout_kl_after"]
    assert not work(out).exists()


def test_signal_during_an_update_waits_for_it(tiny_model, prompt_files, reference, tmp_path, monkeypatch):
    """A Ctrl-C that lands inside the optimizer update is held until the step is complete and recorded."""
    out = tmp_path / "baked"
    original = Training.finished

    def finished(self, step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, step, row)

    with monkeypatch.context() as m:
        m.setattr(Training, "finished", finished)
        stopped = run(bake_args(tiny_model, prompt_files, out))
    assert stopped.exit_code == 130, stopped.output
    assert "saved step 3" in stopped.output
    assert len((work(out) / "metrics.jsonl").read_text().splitlines()) == 3

    resumed = run(bake_args(tiny_model, prompt_files, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert adapter_diff(reference, out) <= 1e-6
    assert metrics(out) == metrics(reference)


def stop_at(monkeypatch, tiny_model, prompt_files, out, k, *extra, steps=STEPS, save_every=2):
    """A bake (distill with `extra` flags) stopped by Ctrl-C during step k."""
    with monkeypatch.context() as m:
        at_train_step(m, k, send(signal.SIGINT))
        result = run(bake_args(tiny_model, prompt_files, out, *extra, steps=steps, save_every=save_every))
    assert result.exit_code == 130, result.output
    return result


def test_resume_with_other_settings_is_refused(tiny_model, prompt_files, tmp_path, monkeypatch):
    out = tmp_path / "baked"
    stop_at(monkeypatch, tiny_model, prompt_files, out, 4)
    before = sorted(p.name for p in work(out).iterdir())

    lr = run(bake_args(tiny_model, prompt_files, out, "--lr", "0.001"))
    assert lr.exit_code == 2
    assert lr.output.strip() == (f"error: {work(out)} holds a stopped bake with other settings: --lr was 0.0005, "
                                 f"now 0.001. Resume with the same settings, or delete {work(out)} to start afresh.")

    other_prompt = tmp_path / "other.txt"
    other_prompt.write_text("Be terse.", encoding="utf-8")
    args = bake_args(tiny_model, prompt_files, out)
    args[args.index("--prompt") + 1] = str(other_prompt)
    prompt = run(args)
    assert prompt.exit_code == 2 and "the system prompt (--prompt file contents) differs" in prompt.output
    assert "Be terse" not in prompt.output

    batch = run(bake_args(tiny_model, prompt_files, out, "--batch-size", "3"))
    assert batch.exit_code == 2 and "--batch-size was 2, now 3" in batch.output

    fewer = run(bake_args(tiny_model, prompt_files, out, steps=2))
    assert fewer.exit_code == 2
    assert "holds a checkpoint at step 3, past --steps 2; pass --steps 3 or more" in fewer.output

    assert sorted(p.name for p in work(out).iterdir()) == before  # refusals touch nothing
    assert not out.exists()


def test_resume_without_a_work_folder_is_an_error(tiny_model, prompt_files, tmp_path):
    out = tmp_path / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--resume"))
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --resume: there is no stopped bake to continue for --out {out} "
                                     f"({work(out)} doesn't exist).")
    assert not out.exists() and not work(out).exists()


def test_more_steps_on_resume_equals_a_longer_bake(tiny_model, prompt_files, reference, tmp_path, monkeypatch):
    """--steps may grow on resume: a 5-step bake stopped, resumed with --steps 8, equals the 8-step bake."""
    out = tmp_path / "baked"
    stop_at(monkeypatch, tiny_model, prompt_files, out, 4, steps=5)
    resumed = run(bake_args(tiny_model, prompt_files, out, steps=STEPS))
    assert resumed.exit_code == 0, resumed.output
    assert adapter_diff(reference, out) <= 1e-6


@pytest.fixture(scope="module")
def cosine_reference(tiny_model, prompt_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cosine") / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--lr-schedule", "cosine"))
    assert result.exit_code == 0, result.output
    return out


def test_cosine_schedule_resumes_exactly(tiny_model, prompt_files, reference, cosine_reference, tmp_path,
                                         monkeypatch):
    """The rate is set from (step, --steps, --lr) before each update, so there is no scheduler state: a cosine
    bake stopped and resumed ends as the uninterrupted one does. Each metrics row logs its step's rate."""
    assert [r["lr"] for r in metrics(reference)] == [5e-4] * STEPS
    rows = metrics(cosine_reference)
    assert [r["lr"] for r in rows] == [lr_at(s, STEPS, 5e-4, "cosine") for s in range(1, STEPS + 1)]
    assert rows[0]["lr"] == 5e-4 and rows[-1]["lr"] == pytest.approx(5e-5)
    assert adapter_diff(reference, cosine_reference) > 1e-5  # the schedule changes the bake

    out = tmp_path / "baked"
    cosine = ("--lr-schedule", "cosine")
    with monkeypatch.context() as m:
        at_train_step(m, 6, send(signal.SIGINT))
        stopped = run(bake_args(tiny_model, prompt_files, out, *cosine))
    assert stopped.exit_code == 130 and "saved step 5" in stopped.output, stopped.output

    # Another schedule, or other --steps (which would reshape this one), is refused.
    constant = run(bake_args(tiny_model, prompt_files, out))
    assert constant.exit_code == 2
    assert constant.output.strip() == (f"error: {work(out)} holds a stopped bake with other settings: --lr-schedule "
                                       f"was cosine, now constant. Resume with the same settings, or delete "
                                       f"{work(out)} to start afresh.")
    longer = run(bake_args(tiny_model, prompt_files, out, *cosine, steps=10))
    assert longer.exit_code == 2
    assert "--steps was 8, now 10 (the cosine --lr-schedule's rate at every step depends on --steps)" in longer.output

    resumed = run(bake_args(tiny_model, prompt_files, out, *cosine))
    assert resumed.exit_code == 0, resumed.output
    assert adapter_diff(cosine_reference, out) <= 1e-6
    assert metrics(out) == metrics(cosine_reference)


def test_checkpoints_by_time_keep_the_last_two(tiny_model, prompt_files, reference, tmp_path, monkeypatch):
    """With SAVE_SECONDS elapsed every step, each step is saved whatever --save-every says; two are kept."""
    import promptbake.checkpoint

    out = tmp_path / "baked"
    monkeypatch.setattr(promptbake.checkpoint, "SAVE_SECONDS", 0)
    stop_at(monkeypatch, tiny_model, prompt_files, out, 6, save_every=100)
    assert checkpoints(out) == ["step-000004.pt", "step-000005.pt"]
    resumed = run(bake_args(tiny_model, prompt_files, out, save_every=100))
    assert resumed.exit_code == 0, resumed.output
    assert adapter_diff(reference, out) <= 1e-6


def test_a_stale_work_folder_without_checkpoints_is_replaced(tiny_model, prompt_files, reference, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "baked"
    stop_at(monkeypatch, tiny_model, prompt_files, out, 1, save_every=100)  # stopped before any checkpoint
    result = run(bake_args(tiny_model, prompt_files, out, "--lr", "0.0004"))
    assert result.exit_code == 0, result.output
    assert f"note: discarded {work(out)}: a bake with other settings stopped there before its first checkpoint." \
        in result.output


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_model, prompt_files, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "baked"
    original = StudentTeacher.student_states
    calls = {"n": 0}

    def nan_at_5(self, ro):
        hidden = original(self, ro)
        calls["n"] += 1
        return hidden * float("nan") if calls["n"] == 5 else hidden

    monkeypatch.setattr(StudentTeacher, "student_states", nan_at_5)
    result = run(bake_args(tiny_model, prompt_files, out))
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1] == (
        f"error: step 5: the loss or gradient became nan; nothing was written to {out} and the last checkpoint "
        f"(step 4) is kept in {work(out)}. Lower --lr (now 0.0005) or use --quant none, and delete {work(out)} "
        "to start afresh.")
    assert not out.exists()
    assert not list(tmp_path.glob(".baked.partial-*"))
    ckpt = torch.load(work(out) / "step-000004.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["adapter"].values())
    assert len((work(out) / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("temperature", ["1", "0"])
def test_weights_blown_up_by_a_huge_lr_are_never_merged(tiny_model, prompt_files, tmp_path, temperature):
    """Finite gradients, but lr 1e30 makes the outputs inf/nan: sampling (or the held-out KL) must stop the bake."""
    out = tmp_path / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--lr", "1e30", "--temperature", temperature, steps=1))
    assert result.exit_code == 3, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert "inf or nan" in result.output or "held-out KL is nan" in result.output
    assert not out.exists()


def test_out_of_memory_is_one_line_with_advice(tiny_model, prompt_files, tmp_path, monkeypatch):
    import torch

    out = tmp_path / "baked"

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    at_train_step(monkeypatch, 3, oom)
    result = run(bake_args(tiny_model, prompt_files, out))
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1] == (
        "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB). To use less: lower --batch-size "
        "(now 2), --max-new-tokens (now 8) or --chunk-size (now 128), or train on a quantised base with --quant "
        f"4bit. Only --chunk-size can change when resuming from {work(out)}."
    )
    assert checkpoints(out) == ["step-000002.pt"] and not out.exists()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["merged weights", "final rename"])
def test_disk_full_while_writing_leaves_old_output_and_checkpoint(tiny_model, prompt_files, reference, tmp_path,
                                                                  monkeypatch, where):
    out = tmp_path / "baked"
    shutil.copytree(reference, out)  # an earlier, complete output
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with monkeypatch.context() as m:
        if where == "merged weights":
            import promptbake.merge

            def half_written(peft_model, adapter_dir, folder, **kwargs):
                (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
                _enospc()

            m.setattr(promptbake.merge, "save_merged", half_written)
        else:
            real_replace = os.replace

            def replace(src, dst):
                if Path(dst) == out and ".partial-" in Path(src).name:  # moving the new output into place
                    _enospc()
                real_replace(src, dst)

            m.setattr(os, "replace", replace)
        # --force: out holds this same bake (up to date), and the point is to write it again.
        failed = run(bake_args(tiny_model, prompt_files, out, "--overwrite", "--force"))
    assert failed.exit_code == 3, failed.output
    assert failed.output.strip().splitlines()[-1] == (
        f"error: can't write --out {out} (No space left on device); it was left as it was. The trained adapter is "
        f"kept in {work(out)}: free some space and run the same command again to finish without retraining."
    )
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    assert checkpoints(out)[-1] == f"step-{STEPS:06d}.pt"

    finished = run(bake_args(tiny_model, prompt_files, out, "--overwrite", "--force"))
    assert finished.exit_code == 0, finished.output
    assert "step 1/" not in finished.output  # no training again
    assert adapter_diff(reference, out) <= 1e-6
    assert not work(out).exists()


def test_disk_full_while_saving_a_checkpoint(tiny_model, prompt_files, tmp_path, monkeypatch):
    out = tmp_path / "baked"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "step-000004.pt":
            _enospc()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = run(bake_args(tiny_model, prompt_files, out))
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1] == (
        f"error: can't save the step 4 checkpoint in {work(out)} (No space left on device); the checkpoint of "
        "step 2 is kept. Free some space and run the same command again."
    )
    assert checkpoints(out) == ["step-000002.pt"]
    assert [p.name for p in work(out).iterdir() if p.name.startswith(".")] == []  # no temporary file left


LONG = 30  # enough steps that a real process is still training when the signal comes


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_real_process_stopped_by_a_signal_resumes(tiny_model, prompt_files, tmp_path, signum):
    """`python -m promptbake.cli distill` killed mid-bake; the same command in-process finishes it identically."""
    ref = tmp_path / "ref"
    assert run(bake_args(tiny_model, prompt_files, ref, steps=LONG)).exit_code == 0
    out = tmp_path / "baked"
    args = bake_args(tiny_model, prompt_files, out, steps=LONG, save_every=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # one thread, as in-process (conftest)
    proc = subprocess.Popen([sys.executable, "-m", "promptbake.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (work(out) / "step-000002.pt").exists():  # kill once training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        if signum == signal.SIGKILL:
            time.sleep(random.uniform(0, 0.5))  # any moment: mid-step, mid-checkpoint, mid-metrics row
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    saved = int(checkpoints(out)[-1][5:11])
    if signum == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert f"interrupted: stopped by Ctrl-C during step {saved + 1}: saved step {saved} in {work(out)}" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()

    resumed = run(bake_args(tiny_model, prompt_files, out, steps=LONG, save_every=1))
    assert resumed.exit_code == 0, resumed.output
    assert f"kept in {work(out)} from step {saved};" in resumed.output  # at most the steps after it were lost
    diff = adapter_diff(ref, out)
    print(f"{signum.name} to a real process after step {saved}: max abs adapter difference after resume {diff:.3g}")
    assert diff <= 1e-6
    assert metrics(out) == metrics(ref)
