"""What promptbake loads and writes: no pickle unless asked, the system prompt never leaks, the user's umask."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
from conftest import SECRET
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.pair import StudentTeacher


def bake_args(model, prompt_files, out, *extra) -> list[str]:
    system, prompts = prompt_files
    return ["distill", "--model", str(model), "--prompt", str(system), "--prompts", str(prompts), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--max-new-tokens", "8", "--holdout", "0.3", *extra]


def run(args):
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def pickle_only_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its weights as pytorch_model.bin only (as older hub repos ship them)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_checkpoint_is_refused(pickle_only_model, prompt_files, tmp_path):
    out = tmp_path / "baked"
    result = run(bake_args(pickle_only_model, prompt_files, out))
    assert result.exit_code == 2
    assert result.output == (
        f"error: model folder {pickle_only_model} holds its weights only as pickle (pytorch_model.bin), and loading "
        "pickle can run code: convert it to safetensors, or pass --allow-pickle if you trust where it came from.\n"
    )
    assert not out.exists() and not (tmp_path / "baked.work").exists()


def test_pickle_only_checkpoint_loads_with_allow_pickle(pickle_only_model, prompt_files, tmp_path):
    out = tmp_path / "baked"
    result = run(bake_args(pickle_only_model, prompt_files, out, "--allow-pickle"))
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()  # and what promptbake writes is safetensors again


def every_file(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_system_prompt_appears_nowhere(tiny_model, prompt_files, tmp_path, capfd, monkeypatch):
    secret = SECRET.encode("utf-8")
    stopped_out = tmp_path / "stopped"
    original = StudentTeacher.student_states

    def stop_at_step_2(self, ro):
        if stop_at_step_2.calls == 1:
            os.kill(os.getpid(), signal.SIGINT)
        stop_at_step_2.calls += 1
        return original(self, ro)

    stop_at_step_2.calls = 0
    with monkeypatch.context() as m:
        m.setattr(StudentTeacher, "student_states", stop_at_step_2)
        stopped = run(bake_args(tiny_model, prompt_files, stopped_out))
    assert stopped.exit_code == 130
    work_files = every_file(tmp_path / "stopped.work")
    assert work_files and not [p for p, data in work_files.items() if secret in data]

    out = tmp_path / "baked"
    result = run(bake_args(tiny_model, prompt_files, out))
    assert result.exit_code == 0
    captured = capfd.readouterr()
    for text in (stopped.output, result.output, captured.out, captured.err):
        assert SECRET not in text
    files = every_file(out)
    assert files and not [p for p, data in files.items() if secret in data]
    record = json.loads((out / "promptbake.json").read_text())
    assert "system_prompt" not in record and len(record["system_prompt_sha256"]) == 64


def test_record_prompt_keeps_it_in_promptbake_json_only(tiny_model, prompt_files, tmp_path, capfd):
    out = tmp_path / "baked"
    result = run(bake_args(tiny_model, prompt_files, out, "--record-prompt"))
    assert result.exit_code == 0
    assert json.loads((out / "promptbake.json").read_text())["system_prompt"] == SECRET
    leaks = [p.name for p, data in every_file(out).items() if SECRET.encode() in data]
    assert leaks == ["promptbake.json"]
    captured = capfd.readouterr()
    assert SECRET not in result.output + captured.out + captured.err
    assert "recorded in `promptbake.json`" in (out / "README.md").read_text()


def test_output_follows_the_umask(tiny_model, prompt_files, tmp_path):
    out = tmp_path / "baked"
    old = os.umask(0o027)
    try:
        result = run(bake_args(tiny_model, prompt_files, out))
    finally:
        os.umask(old)
    assert result.exit_code == 0
    modes = {p.relative_to(tmp_path): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (tmp_path / p).is_dir() else 0o640)}
    assert wrong == {}
    assert (out / "model.safetensors") in [tmp_path / p for p in modes]  # safetensors writes 0600 by itself
