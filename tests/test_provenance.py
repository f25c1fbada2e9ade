"""eval and chat refuse to compare a bake with a base or a prompt it wasn't made from, unless --force."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from test_overwrite_safety import finished_output

from promptbake.errors import InputError
from promptbake.models import model_fingerprint, resolve_model
from promptbake.provenance import check_bake_inputs, check_same_tokenizer
from tiny import build_tokenizer

PROMPT = "Talk like a pirate."


def baked_from(folder, model: str, prompt: str = PROMPT, **extra) -> None:
    finished_output(folder)
    record = json.loads((folder / "promptbake.json").read_text())
    record.update(base_model=model, system_prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(), **extra)
    (folder / "promptbake.json").write_text(json.dumps(record))


def test_the_bakes_own_model_and_prompt_pass(tmp_path, tiny_model):
    baked_from(tmp_path / "baked", str(tiny_model))
    record = check_bake_inputs(tmp_path / "baked", model=str(tiny_model), system=PROMPT)
    assert record["base_model"] == str(tiny_model)


def test_another_model_or_prompt_is_refused_naming_both_sides(tmp_path, tiny_model):
    baked = tmp_path / "baked"
    baked_from(baked, "org/base")
    other = hashlib.sha256(b"Talk like a cat.").hexdigest()
    mine = hashlib.sha256(PROMPT.encode()).hexdigest()
    with pytest.raises(InputError) as err:
        check_bake_inputs(baked, model=str(tiny_model), system="Talk like a cat.")
    assert str(err.value) == (
        f"--baked {baked} doesn't match: --model {tiny_model} is not the bake's base org/base; --prompt is not the "
        f"prompt baked in (its SHA-256 is {other[:12]}…, the baked one's {mine[:12]}…). Pass the --model and "
        "--prompt the bake was made from, or --force to compare them anyway.")


def test_force_compares_anyway_with_a_note(tmp_path, tiny_model):
    baked_from(tmp_path / "baked", "org/base")
    notes = []
    assert check_bake_inputs(tmp_path / "baked", model=str(tiny_model), system=PROMPT, force=True,
                             note=notes.append) is not None
    assert notes == [f"comparing anyway (--force): --model {tiny_model} is not the bake's base org/base."]


def test_the_same_folder_by_another_relative_path_passes(tmp_path, tiny_model, monkeypatch):
    baked_from(tmp_path / "baked", str(tiny_model))
    monkeypatch.chdir(tiny_model.parent)
    check_bake_inputs(tmp_path / "baked", model=f"./{tiny_model.name}", system=PROMPT)


def test_the_fingerprint_tells_a_changed_model_at_the_same_path(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, copy_function=shutil.copy2)
    src = resolve_model(str(model))
    baked_from(tmp_path / "baked", str(model), base_fingerprint=model_fingerprint(src))
    check_bake_inputs(tmp_path / "baked", model=str(model), system=PROMPT, fingerprint=model_fingerprint(src))
    copy = tmp_path / "copy"  # the same files elsewhere, times kept: the same model
    shutil.copytree(model, copy, copy_function=shutil.copy2)
    check_bake_inputs(tmp_path / "baked", model=str(copy), system=PROMPT,
                      fingerprint=model_fingerprint(resolve_model(str(copy))))
    (model / "chat_template.jinja").write_text("{{ messages }}")
    expected = rf"--model {model} changed since the bake: its chat template differs\. Pass"
    with pytest.raises(InputError, match=expected):
        check_bake_inputs(tmp_path / "baked", model=str(model), system=PROMPT, fingerprint=model_fingerprint(src))


def test_a_folder_without_a_finished_record_is_not_checked(tmp_path):
    (tmp_path / "plain").mkdir()
    assert check_bake_inputs(tmp_path / "plain", model="x", system="y") is None


def test_a_baked_tokenizer_that_differs_is_refused():
    base, baked = build_tokenizer(), build_tokenizer()
    check_same_tokenizer(baked, base, baked="out", model="m")
    baked.add_tokens(["<extra>"])
    with pytest.raises(InputError) as err:
        check_same_tokenizer(baked, base, baked="out", model="m")
    assert str(err.value) == (
        f"the tokenizer of --baked out differs from that of --model m ({len(base) + 1} tokens vs {len(base)}), so "
        "their answers can't be scored against each other. Pass the --model the bake was made from, or --force to "
        "compare them anyway.")
    notes = []
    check_same_tokenizer(baked, base, baked="out", model="m", force=True, note=notes.append)
    assert len(notes) == 1 and notes[0].startswith("comparing anyway (--force): the tokenizer of --baked out differs")
