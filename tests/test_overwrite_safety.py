"""--out and --overwrite never cost the user a file: `output.check_output` and `output.publish` on real folders.

Every test that refuses or fails puts marker files where a user's files would be and checks that each
one is still there, byte for byte, and that the message says what really happened.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from promptbake.errors import InputError, OutputExistsError, WriteError
from promptbake.output import (RECORD_KEYS, check_output, is_write_error, make_staging, output_files, publish,
                               resolve_out, write_error)

RULE = "choose another --out: promptbake never writes over what it reads or where it runs."


def markers(folder: Path, n: int = 3) -> dict[str, bytes]:
    """Put n user files (one in a subfolder) into `folder`; return what they hold."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / ("sub" if i == 0 else ".") / f"user-{i}.txt").write_bytes(f"user file {i}\n".encode())
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_output(folder: Path, *, files: bool = True, tag: str = "old") -> dict[str, bytes]:
    """A folder laid out as a finished bake: weights, config, metrics and a promptbake.json record."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(f"{tag} adapter".encode())
    (folder / "model.safetensors").write_bytes(f"{tag} weights".encode())
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    record = {k: f"{tag} {k}" for k in RECORD_KEYS}
    if files:
        record["files"] = output_files(folder)
    (folder / "promptbake.json").write_text(json.dumps(record))
    (folder / "README.md").write_text(f"{tag} card")
    return snapshot(folder)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- check_output: where --out may point


def test_relative_out_naming_the_working_directory_is_refused_and_loses_nothing(tmp_path, monkeypatch):
    """The bug: `cd a/b && distill --out ../b --overwrite` deleted b/. publish renamed b away, then resolved
    ../b against the working directory that had moved with it, failed to restore, and deleted the folder
    holding the user's files. Now --out is resolved once, and the working directory may not be --out."""
    cwd = tmp_path / "a" / "b"
    kept = markers(cwd)
    monkeypatch.chdir(cwd)
    with pytest.raises(InputError) as err:
        check_output("../b", True)
    assert str(err.value) == f"--out {cwd} is the current directory ({cwd}) itself; {RULE}"
    assert snapshot(cwd) == kept and hidden(tmp_path / "a") == []


def test_publish_refuses_relative_paths_before_moving_anything(tmp_path, monkeypatch):
    cwd = tmp_path / "a" / "b"
    kept = markers(cwd)
    staging = tmp_path / "a" / ".b.partial-abcdefgh"
    finished_output(staging, tag="new")
    monkeypatch.chdir(cwd)
    with pytest.raises(ValueError, match="absolute"):
        publish(staging, Path("../b"), True)
    assert snapshot(cwd) == kept


@pytest.mark.parametrize("out, expected", [
    (".", "is the current directory ({cwd}) itself"),
    ("..", "contains the current directory ({cwd})"),
    ("{cwd}", "is the current directory ({cwd}) itself"),
    ("{root}", "contains the current directory ({cwd})"),
])
def test_out_may_not_be_or_contain_the_working_directory(tmp_path, monkeypatch, out, expected):
    root, cwd = tmp_path / "root", tmp_path / "root" / "project"
    kept = markers(cwd)
    monkeypatch.chdir(cwd)
    resolved = resolve_out(out.format(cwd=cwd, root=root))
    with pytest.raises(InputError) as err:
        check_output(out.format(cwd=cwd, root=root), True)
    assert str(err.value) == f"--out {resolved} {expected.format(cwd=cwd)}; {RULE}"
    assert snapshot(cwd) == kept


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Input files laid out as a user might: a model folder under models/, prompts in one folder."""
    model = tmp_path / "models" / "base"
    teacher = tmp_path / "models" / "big"
    for folder in (model, teacher):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "texts").mkdir()
    paths = {"--model": model, "--teacher": teacher, "--prompt": tmp_path / "texts" / "sys.txt",
             "--prompts": tmp_path / "texts" / "prompts.txt", "--chat-template": tmp_path / "tpl" / "chat.jinja",
             "--checks": tmp_path / "tpl" / "sys.checks.toml"}
    for flag, path in paths.items():
        if flag not in ("--model", "--teacher"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"{flag} contents")
    return paths


@pytest.mark.parametrize("out, expected", [
    ("models/base", "is --model {models}/base itself; " + RULE),
    ("models", "contains --model {models}/base; " + RULE),
    ("models/base/baked", "lies inside --model {models}/base; choose an --out outside it."),
    ("models/big", "is --teacher {models}/big itself; " + RULE),
    ("models/big/x/y", "lies inside --teacher {models}/big; choose an --out outside it."),
    ("texts", "contains --prompt {tmp}/texts/sys.txt; " + RULE),
    ("tpl", "contains --chat-template {tmp}/tpl/chat.jinja; " + RULE),
])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_may_not_be_contain_or_lie_inside_an_input(tmp_path, inputs, monkeypatch, out, expected, overwrite):
    monkeypatch.chdir(tmp_path / "texts")  # relative --out would name other folders from here: use absolute ones
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        check_output(tmp_path / out, overwrite, inputs=inputs)
    assert str(err.value) == f"--out {tmp_path / out} " + expected.format(models=tmp_path / "models", tmp=tmp_path)
    assert snapshot(tmp_path) == before


def test_out_that_is_an_input_file_is_refused(tmp_path, inputs):
    with pytest.raises(InputError, match=r"is --prompts .*prompts.txt itself"):
        check_output(inputs["--prompts"], True, inputs=inputs)


def test_inputs_compare_through_symlinks(tmp_path, inputs):
    (tmp_path / "link").symlink_to(tmp_path / "models")
    with pytest.raises(InputError, match=r"lies inside --model"):
        check_output(tmp_path / "link" / "base" / "baked", False, inputs=inputs)


def test_inputs_that_are_not_paths_are_skipped(tmp_path):
    out = check_output(tmp_path / "baked", False, inputs={"--model": "org/name", "--prompts": "default",
                                                         "--teacher": None}, cwd=tmp_path / "elsewhere")
    assert out == tmp_path / "baked"


def test_out_is_resolved_once_to_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert check_output("../c/baked", False) == tmp_path / "a" / "c" / "baked"
    assert check_output("baked", False) == tmp_path / "a" / "b" / "baked"


# ---------------------------------------------------------------- check_output: what --overwrite may replace


def test_overwrite_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / "userdir"
    kept = markers(out)
    with pytest.raises(OutputExistsError) as err:
        check_output(out, True, cwd=tmp_path)
    assert str(err.value) == (
        f"--out {out} is not a promptbake output (no readable promptbake.json) and holds 3 entries (sub/, "
        "user-1.txt, user-2.txt); --overwrite replaces only a finished promptbake output or an empty folder: "
        "choose another --out, or move those files away."
    )
    assert snapshot(out) == kept


def test_overwrite_refuses_a_promptbake_json_that_is_not_a_finished_record(tmp_path):
    out = tmp_path / "userdir"
    kept = markers(out)
    (out / "promptbake.json").write_text('{"note": "my own file"}')
    kept = snapshot(out)
    with pytest.raises(OutputExistsError, match="is not a promptbake output"):
        check_output(out, True, cwd=tmp_path)
    assert snapshot(out) == kept


def test_overwrite_refuses_a_finished_output_the_user_added_files_to(tmp_path):
    out = tmp_path / "baked"
    finished_output(out)
    (out / "notes.txt").write_text("my notes")
    kept = snapshot(out)
    with pytest.raises(OutputExistsError) as err:
        check_output(out, True, cwd=tmp_path)
    assert str(err.value).startswith(f"--out {out} is a promptbake output but also holds 1 entry (notes.txt), "
                                     "which promptbake didn't write; --overwrite replaces only")
    assert snapshot(out) == kept


@pytest.mark.parametrize("kind", ["finished", "finished, older record without a file list", "empty"])
def test_overwrite_accepts_a_finished_output_or_an_empty_folder(tmp_path, kind):
    out = tmp_path / "baked"
    if kind == "empty":
        out.mkdir()
    else:
        finished_output(out, files="older" not in kind)
    assert check_output(out, True, cwd=tmp_path) == out
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output(out, False, cwd=tmp_path)


def test_out_that_is_a_symlink_is_refused(tmp_path):
    target = tmp_path / "real"
    finished_output(target)
    (tmp_path / "baked").symlink_to(target)
    with pytest.raises(InputError, match=r"is a symbolic link \(to .*real\)"):
        check_output(tmp_path / "baked", True, cwd=tmp_path)


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "baked").write_text("mine")
    with pytest.raises(InputError, match="exists and is a file"):
        check_output(tmp_path / "baked", True, cwd=tmp_path)
    assert (tmp_path / "baked").read_text() == "mine"


# ---------------------------------------------------------------- publish


def make_staging_and_fill(out: Path) -> Path:
    staging = make_staging(out)
    finished_output(staging, tag="new")
    return staging


def test_publish_replaces_a_finished_output(tmp_path):
    out = tmp_path / "baked"
    finished_output(out)
    staging = make_staging_and_fill(out)
    new = snapshot(staging)
    publish(staging, out, True)
    assert snapshot(out) == new
    assert hidden(tmp_path) == []  # neither the staging folder nor the old output is left beside it


def test_publish_into_a_new_place_and_over_an_empty_folder(tmp_path):
    for out in (tmp_path / "new" / "baked", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        staging = make_staging_and_fill(out)
        publish(staging, out, True)
        assert (out / "model.safetensors").read_bytes() == b"new weights"
        assert hidden(out.parent) == []


def test_publish_refuses_an_output_that_changed_while_baking(tmp_path):
    out = tmp_path / "baked"
    finished_output(out)
    staging = make_staging_and_fill(out)
    (out / "notes.txt").write_text("added while the bake ran")
    kept = snapshot(out)
    with pytest.raises(OutputExistsError) as err:
        publish(staging, out, True, kept="The trained adapter is kept in W")
    assert str(err.value) == (
        f"--out {out} changed while baking: it is a promptbake output but also holds 1 entry (notes.txt), which "
        "promptbake didn't write, so nothing was replaced. The trained adapter is kept in W: move those files "
        "away and run the same command again."
    )
    assert snapshot(out) == kept and (staging / "model.safetensors").is_file()


def test_publish_without_overwrite_refuses_an_output_that_appeared(tmp_path):
    out = tmp_path / "baked"
    staging = make_staging_and_fill(out)
    kept = markers(out)
    with pytest.raises(OutputExistsError, match="appeared while baking; nothing was replaced"):
        publish(staging, out, False)
    assert snapshot(out) == kept


def failing_replace(monkeypatch, code: int, when):
    """os.replace raising OSError(code) for the renames `when(src, dst)` picks; the others really happen."""
    real = os.replace

    def replace(src, dst):
        if when(Path(src), Path(dst)):
            raise OSError(code, os.strerror(code))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_publish_puts_the_old_output_back_when_the_new_one_cant_move_in(tmp_path, monkeypatch):
    out = tmp_path / "baked"
    old = finished_output(out)
    staging = make_staging_and_fill(out)
    failing_replace(monkeypatch, errno.ENOSPC, lambda src, dst: src == staging)
    with pytest.raises(WriteError) as err:
        publish(staging, out, True, kept="The trained adapter is kept in W")
    assert str(err.value) == (f"can't write --out {out} (No space left on device); it was left as it was. The "
                              "trained adapter is kept in W: free some space and run the same command again to "
                              "finish without retraining.")
    assert snapshot(out) == old
    assert hidden(tmp_path) == [staging.name]  # the caller removes its staging; no .old-* left


@pytest.mark.parametrize("code, advice", [
    (errno.EROFS, "it is on a read-only file system: make it writable and run the same command again"),
    (errno.EBUSY, "the folder is busy (a mount point, or in use): free it and run the same command again"),
    (errno.EACCES, "you may not write there: fix the permissions and run the same command again"),
])
def test_a_failed_rename_is_not_called_a_full_disk(tmp_path, monkeypatch, code, advice):
    out = tmp_path / "baked"
    old = finished_output(out)
    staging = make_staging_and_fill(out)
    failing_replace(monkeypatch, code, lambda src, dst: src == out)  # moving the old output aside
    with pytest.raises(WriteError) as err:
        publish(staging, out, True, kept="K")
    assert str(err.value) == f"can't write --out {out} ({os.strerror(code)}); it was left as it was. K: {advice}."
    assert "space" not in str(err.value)
    assert snapshot(out) == old and hidden(tmp_path) == [staging.name]  # no empty .baked.old-* left


def test_when_even_the_restore_fails_the_message_says_where_the_old_output_is(tmp_path, monkeypatch):
    out = tmp_path / "baked"
    old = finished_output(out)
    staging = make_staging_and_fill(out)
    failing_replace(monkeypatch, errno.EIO, lambda src, dst: dst == out)  # both renames into `out` fail
    with pytest.raises(WriteError) as err:
        publish(staging, out, True, kept="K")
    aside = next(tmp_path.glob(".baked.old-*"))
    assert str(err.value) == (f"can't write --out {out} (Input/output error), and putting the earlier output back "
                              f"failed too (Input/output error): it is kept, whole, in {aside}; move it back to "
                              f"{out}. K.")
    assert snapshot(aside) == old


def test_ctrl_c_between_the_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "baked"
    old = finished_output(out)
    staging = make_staging_and_fill(out)
    real = os.replace

    def replace(src, dst):
        if Path(src) == staging:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        publish(staging, out, True)
    assert snapshot(out) == old


def test_library_errors_wrapping_a_full_disk_are_write_errors(tmp_path):
    err = Exception("No space left on device (os error 28)")  # what tokenizers' save raises
    assert is_write_error(err)
    assert not is_write_error(Exception("data did not match any variant"))
    message = str(write_error(err, tmp_path / "baked", kept="K"))
    assert message == (f"can't write --out {tmp_path / 'baked'} (No space left on device); it was left as it was. "
                       "K: free some space and run the same command again to finish without retraining.")
