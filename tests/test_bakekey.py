"""The bake key: what changes it, what doesn't; an up-to-date --out is skipped, --force bakes again;
the resolved settings file reproduces the bake; a resumed bake reports the time of all its processes."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace

import pytest

from ci_bakes import SETTINGS, ci_bake, invoke  # noqa: F401  (ci_bake: a session fixture)
from promptbake.config import DistillConfig
from promptbake.pair import StudentTeacher
from promptbake.setup import read_inputs


@pytest.fixture
def base(tiny_model, prompt_files, tmp_path) -> DistillConfig:
    system, prompts = prompt_files
    return DistillConfig(model=str(tiny_model), prompt=system, prompts=str(prompts), out=tmp_path / "o", **SETTINGS)


def key(cfg: DistillConfig) -> str:
    return read_inputs(cfg).key.key


def test_key_ignores_what_does_not_change_the_weights(base, tmp_path):
    k = key(base)
    assert len(k) == 64 and key(base) == k  # stable
    for change in (dict(out=tmp_path / "elsewhere"), dict(save_every=3), dict(chunk_size=16), dict(eval=False),
                   dict(record_prompt=True), dict(trust_remote_code=True)):
        assert key(replace(base, **change)) == k, change


def test_key_changes_with_every_input(base, tmp_path, tiny_model):
    k = key(base)
    # A setting that changes the weights.
    for change in (dict(steps=3), dict(lr=1e-3), dict(seed=1), dict(lora_rank=8), dict(max_new_tokens=9),
                   dict(temperature=0.5), dict(quant="none"), dict(lr_schedule="cosine"), dict(samples_per_prompt=2)):
        assert key(replace(base, **change)) != k, change
    # The system prompt's text (same file name, other contents).
    system = tmp_path / "system.txt"
    system.write_text(base.prompt.read_text() + " Also rhyme.", encoding="utf-8")
    assert key(replace(base, prompt=system)) != k
    shutil.copyfile(base.prompt, system)
    assert key(replace(base, prompt=system)) == k  # by content, not by path
    # The prompt set.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(open(base.prompts).read() + "One more prompt?\n", encoding="utf-8")
    assert key(replace(base, prompts=str(prompts))) != k
    # The model's files: a copy is the same model; one changed byte in its weights is not.
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    assert key(replace(base, model=str(copy))) == k
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert key(replace(base, model=str(copy))) != k


def test_gguf_key_is_the_files_content(tmp_path):
    from promptbake.bakekey import model_identity
    from promptbake.models import resolve_model

    a = tmp_path / "a" / "m.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(200)))
    b = tmp_path / "b" / "m.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    ia, ib = model_identity(resolve_model(str(a))), model_identity(resolve_model(str(b)))
    assert ia == ib and ia[0].startswith("gguf:") and ia[1] is True
    b.write_bytes(b"GGUF" + bytes(range(1, 201)))
    assert model_identity(resolve_model(str(b))) != ia


def test_record_holds_the_key_and_settings_file(ci_bake, base):
    record = ci_bake.record
    assert record["bake"]["key"] == key(replace(base, out=ci_bake.out))
    assert record["settings_file"] == "promptbake.toml" and (ci_bake.out / "promptbake.toml").is_file()
    assert record["results"]["processes"] == 1


def test_up_to_date_out_is_skipped_in_about_a_second(ci_bake):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ci_bake.out.iterdir())
    started = time.monotonic()
    result = invoke("distill", "--config", ci_bake.config)
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert f"up to date: --out {ci_bake.out} already holds this bake" in result.stderr.replace("\n", "")
    assert "Pass --force to bake again." in result.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ci_bake.out.iterdir()) == before  # untouched
    print(f"up-to-date check: {elapsed:.2f} s in-process")


def test_a_different_bake_in_out_still_needs_overwrite(ci_bake):
    result = invoke("distill", "--config", ci_bake.config, "--steps", "3")
    assert result.exit_code == 2
    assert f"error: --out {ci_bake.out} already exists; pass --overwrite to replace it" in result.stderr


def test_resolved_settings_reproduce_the_key_and_the_adapter(ci_bake, tmp_path):
    from safetensors.torch import load_file

    other = tmp_path / "again"
    result = invoke("distill", "--config", ci_bake.out / "promptbake.toml", "--out", other, "--no-eval")
    assert result.exit_code == 0, result.output
    again = json.loads((other / "promptbake.json").read_text())
    assert again["bake"]["key"] == ci_bake.record["bake"]["key"]
    a = load_file(ci_bake.out / "adapter" / "adapter_model.safetensors")
    b = load_file(other / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_force_bakes_an_up_to_date_out_again(ci_bake, tmp_path):
    out = tmp_path / "baked"
    shutil.copytree(ci_bake.out, out)
    config = tmp_path / "promptbake.toml"
    config.write_text(ci_bake.config.read_text())
    stamp = (out / "promptbake.json").stat().st_mtime_ns
    assert invoke("distill", "--config", config).exit_code == 0  # up to date
    assert (out / "promptbake.json").stat().st_mtime_ns == stamp
    result = invoke("distill", "--config", config, "--force")
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.stderr and "merging the adapter" in result.stderr
    assert (out / "promptbake.json").stat().st_mtime_ns != stamp  # replaced without --overwrite
    assert json.loads((out / "promptbake.json").read_text())["bake"]["key"] == ci_bake.record["bake"]["key"]
    assert not list(tmp_path.glob(".baked.*"))  # no staging or old copy left beside it


def test_changed_closing_evaluation_is_not_up_to_date(ci_bake):
    result = invoke("distill", "--config", ci_bake.config, "--no-eval")
    assert result.exit_code == 2  # another evaluation would be recorded: the out needs --overwrite
    assert "already exists" in result.stderr


def test_resumed_bake_counts_every_process(tiny_model, prompt_files, tmp_path, monkeypatch):
    system, prompts = prompt_files
    out = tmp_path / "baked"
    args = ["distill", "--model", tiny_model, "--prompt", system, "--prompts", prompts, "--out", out,
            "--steps", "3", "--batch-size", "2", "--max-new-tokens", "8", "--holdout", "0.3", "--save-every", "1",
            "--no-eval"]
    original, calls = StudentTeacher.student_states, {"n": 0}

    def stop_at_step_3(self, ro):
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(1.0)  # time the first process spends before its step-2 checkpoint: the record must include it
        if calls["n"] == 3:
            os.kill(os.getpid(), 2)
        return original(self, ro)

    with monkeypatch.context() as m:
        m.setattr(StudentTeacher, "student_states", stop_at_step_3)
        assert invoke(*args).exit_code == 130
    first = json.loads((tmp_path / "baked.work" / "work.json").read_text())["process_seconds"]
    assert len(first) == 1 and first[0] >= 1.0
    started = time.time()
    assert invoke(*args).exit_code == 0
    second = time.time() - started
    results = json.loads((out / "promptbake.json").read_text())["results"]
    assert results["processes"] == 2
    assert first[0] + second - 1 <= results["wall_seconds"] <= first[0] + second + 1
