"""Broken model files are one `error:` line (ModelLoadError), and `model_fingerprint` sees what changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.errors import ModelLoadError
from promptbake.models import load_model, load_tokenizer, model_fingerprint, resolve_model


def copy_of(tiny_model: Path, tmp_path: Path, name: str = "model") -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


def distill(model: Path, prompt_files, out: Path, *extra: str):
    system, prompts = prompt_files
    result = CliRunner().invoke(app, ["distill", "--model", str(model), "--prompt", str(system), "--prompts",
                                      str(prompts), "--out", str(out), "--steps", "1", "--batch-size", "2",
                                      "--max-new-tokens", "4", "--no-eval", *extra])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.mark.parametrize("damage, reason", [
    ("random", "Error while deserializing header: header too large"),
    ("truncated", "Error while deserializing header: incomplete metadata, file not fully covered"),
])
def test_damaged_safetensors_is_one_error_line(tiny_model, prompt_files, tmp_path, damage, reason):
    model = copy_of(tiny_model, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(4096) if damage == "random" else data[: len(data) // 2])
    result = distill(model, prompt_files, tmp_path / "baked")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (f"error: model {model}: a safetensors weights file is damaged or "
                                              f"incomplete ({reason}); download or copy the model again.")
    assert not (tmp_path / "baked").exists()


def test_a_teacher_with_a_broken_tokenizer_json_is_one_error_line(tiny_model, prompt_files, tmp_path):
    teacher = copy_of(tiny_model, tmp_path, "teacher")
    spec = json.loads((teacher / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {"a": 0}  # its merges now name tokens the vocabulary lacks
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    result = distill(tiny_model, prompt_files, tmp_path / "baked", "--teacher", str(teacher))
    assert result.exit_code == 2
    last = result.output.splitlines()[-1]
    assert last.startswith(f"error: can't load the tokenizer of {teacher}: Token ") and "out of vocabulary" in last
    assert last.endswith("Check its tokenizer files (tokenizer.json, tokenizer_config.json), or download or copy "
                         "them again.")


def test_a_folder_without_tokenizer_files_says_so_in_full(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path)
    for p in model.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            p.unlink()
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(resolve_model(str(model)))
    assert str(err.value) == (f"{model} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): copy "
                              "those of the model it came from into that folder.")


def test_allow_pickle_on_a_malicious_bin_is_refused_and_runs_nothing(tiny_model, prompt_files, tmp_path):
    import torch

    ran = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    model = copy_of(tiny_model, tmp_path)
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, model / "pytorch_model.bin")
    result = distill(model, prompt_files, tmp_path / "baked", "--allow-pickle")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"error: model {model}: torch refused to load its pickle weights because they hold more than tensors, and "
        "unpickling them could run code. Don't use these files; convert a copy you trust to safetensors.")
    assert not ran.exists()


def test_out_of_memory_while_loading_is_not_called_a_broken_model(tiny_model, monkeypatch):
    import torch
    import transformers

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(MemoryError):
        load_model(resolve_model(str(tiny_model)), quant="none", device=torch.device("cpu"), dtype=torch.float32)


# ---------------------------------------------------------------- model_fingerprint


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if before[k] != after[k])


def test_fingerprint_is_stable_and_names_each_changed_part(tiny_model, tmp_path):
    model = copy_of(tiny_model, tmp_path)
    src = resolve_model(str(model))
    first = model_fingerprint(src)
    assert sorted(first) == ["chat_template", "config", "tokenizer", "weights"]
    assert model_fingerprint(src) == first

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert changed(first, now := model_fingerprint(src)) == ["config"]

    (model / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    assert changed(now, now2 := model_fingerprint(src)) == ["chat_template"]

    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": "{{ 'x' }}"}))
    assert changed(now2, now3 := model_fingerprint(src)) == ["chat_template"]  # a template in tokenizer_config
    (model / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": "{{ 'x' }}",
                                                             "model_max_length": 7}))
    assert changed(now3, now4 := model_fingerprint(src)) == ["tokenizer"]

    weights = model / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(weights.read_bytes())  # rewritten in place: same size, new modification time
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert changed(now4, model_fingerprint(src)) == ["weights"]


def test_fingerprint_of_a_copy_that_keeps_times_is_the_same(tiny_model, tmp_path):
    shutil.copytree(tiny_model, tmp_path / "copy", copy_function=shutil.copy2)
    assert model_fingerprint(resolve_model(str(tmp_path / "copy"))) == model_fingerprint(resolve_model(str(tiny_model)))


def test_fingerprint_of_a_gguf_file_is_its_size_and_time(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    src = resolve_model(str(path))
    first = model_fingerprint(src)
    assert list(first) == ["gguf"] and model_fingerprint(src) == first
    os.utime(path, ns=(0, 10**18))
    assert model_fingerprint(src) != first


def test_fingerprint_of_a_hub_model_uses_its_cached_snapshot(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    src = resolve_model("org/tiny")
    first = model_fingerprint(src)
    assert first["tokenizer"] == model_fingerprint(resolve_model(str(tiny_model)))["tokenizer"]
    (repo / "refs" / "main").write_text("b" * 40)  # the hub moved on and a new revision was downloaded
    assert changed(first, model_fingerprint(src)) == ["weights"]
