"""`promptbake distill` / `eval` / `chat` as a hostile user runs them: nothing the user had is ever lost.

Every scenario runs the real command on the tiny model. Where a user's files are at stake they are
real folders holding marker files, and each test checks that every marker survives, byte for byte,
and that the one `error:` line says what really happened.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_overwrite_safety import finished_output, markers, snapshot
from typer.testing import CliRunner

from promptbake.cli import app

STEPS = 2
RULE = "choose another --out: promptbake never writes over what it reads or where it runs."


def args(model, system, prompts, out, *extra, steps=STEPS) -> list[str]:
    return ["distill", "--model", str(model), "--prompt", str(system), "--prompts", str(prompts), "--out", str(out),
            "--steps", str(steps), "--batch-size", "2", "--max-new-tokens", "8", "--holdout", "0.3", "--no-eval",
            *extra]


def run(argv):
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def scratch(tmp_path, tiny_model, prompt_files, monkeypatch):
    """A scratch project like the issue's: model, prompt files and a working directory, all with markers."""
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_model, model)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    system, prompts = inputs / "sys.txt", inputs / "prompts.txt"
    shutil.copy(prompt_files[0], system)
    shutil.copy(prompt_files[1], prompts)
    project = tmp_path / "project"
    markers(project)
    monkeypatch.chdir(project)
    return dict(root=tmp_path, model=model, system=system, prompts=prompts, project=project)


def untouched(scratch) -> dict:
    return snapshot(scratch["root"])


# ---------------------------------------------------------------- --out relations and --overwrite


def test_relative_out_naming_the_working_directory_loses_nothing(scratch, monkeypatch):
    """The issue's data loss: `cd a/b && distill --out ../b --overwrite` deleted b/ and everything in it."""
    cwd = scratch["root"] / "a" / "b"
    markers(cwd)
    before = untouched(scratch)
    monkeypatch.chdir(cwd)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], "../b", "--overwrite"))
    assert result.exit_code == 2
    assert result.output == f"error: --out {cwd} is the current directory ({cwd}) itself; {RULE}\n"
    assert untouched(scratch) == before


@pytest.mark.parametrize("out, expected", [
    ("{model}", "--out {model} is --model {model} itself; " + RULE),
    ("{models}", "--out {models} contains --model {model}; " + RULE),
    ("{model}/baked", "--out {model}/baked lies inside --model {model}; choose an --out outside it."),
    ("{inputs}", "--out {inputs} contains --prompt {inputs}/sys.txt; " + RULE),
    ("{project}", "--out {project} is the current directory ({project}) itself; " + RULE),
    (".", "--out {project} is the current directory ({project}) itself; " + RULE),
    ("..", "--out {root} contains --model {model}; " + RULE),
])
def test_out_that_is_contains_or_lies_inside_an_input_is_refused_before_loading(scratch, monkeypatch, out,
                                                                                  expected):
    import promptbake.setup

    def nothing_may_load(*a, **k):
        raise AssertionError("a model file was read")

    monkeypatch.setattr(promptbake.setup, "load_tokenizer", nothing_may_load)
    before = untouched(scratch)
    names = dict(model=scratch["model"], models=scratch["model"].parent, inputs=scratch["system"].parent,
                 project=scratch["project"], root=scratch["root"])
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out.format(**names), "--overwrite"))
    assert result.exit_code == 2
    assert result.output == f"error: {expected.format(**names)}\n"
    assert untouched(scratch) == before


def test_out_inside_the_model_folder_is_refused_without_overwrite_too(scratch):
    before = untouched(scratch)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], scratch["model"] / "baked"))
    assert result.exit_code == 2 and "lies inside --model" in result.output
    assert untouched(scratch) == before


@pytest.mark.parametrize("flag", ["--chat-template", "--checks", "--teacher"])
def test_out_holding_the_other_inputs_is_refused(scratch, tiny_model, flag):
    folder = scratch["root"] / "extra"
    if flag == "--teacher":
        shutil.copytree(tiny_model, folder / "teacher")
        path = folder / "teacher"
    else:
        folder.mkdir()
        path = folder / ("chat.jinja" if flag == "--chat-template" else "sys.checks.toml")
        path.write_text("{{ messages }}" if flag == "--chat-template" else '[[check]]\nname = "x"\ncontains = "arr"\n')
    before = untouched(scratch)
    extra = [flag, path] + (["--eval"] if flag == "--checks" else [])
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], folder, "--overwrite", *extra))
    assert result.exit_code == 2
    assert last_line(result) == f"error: --out {folder} contains {flag} {path}; {RULE}"
    assert untouched(scratch) == before


def test_overwrite_of_a_folder_of_user_files_is_refused_naming_them(scratch):
    out = scratch["root"] / "userdir"
    markers(out)
    before = untouched(scratch)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--overwrite"))
    assert result.exit_code == 2
    assert result.output == (
        f"error: --out {out} is not a promptbake output (no readable promptbake.json) and holds 3 entries (sub/, "
        "user-1.txt, user-2.txt); --overwrite replaces only a finished promptbake output or an empty folder: choose "
        "another --out, or move those files away.\n")
    assert untouched(scratch) == before


@pytest.fixture
def baked(scratch) -> Path:
    out = scratch["root"] / "baked"
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out))
    assert result.exit_code == 0, result.output
    return out


def test_a_finished_output_lists_its_files_and_is_replaced_whole(scratch, baked):
    record = json.loads((baked / "promptbake.json").read_text())
    assert record["files"] == sorted(os.listdir(baked))
    (baked / "model.safetensors").write_bytes(b"old")  # to see it replaced
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], baked, "--overwrite", "--force"))  # same settings: --force bakes again
    assert result.exit_code == 0, result.output
    assert (baked / "model.safetensors").read_bytes() != b"old"
    assert [p.name for p in baked.parent.iterdir() if p.name.startswith(".")] == []


def test_a_finished_output_the_user_added_a_file_to_is_not_replaced(scratch, baked):
    (baked / "my-notes.txt").write_text("mine")
    before = untouched(scratch)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], baked, "--overwrite", "--force"))  # same settings: --force bakes again
    assert result.exit_code == 2
    assert "also holds 1 entry (my-notes.txt), which promptbake didn't write" in result.output
    assert untouched(scratch) == before


def test_an_empty_folder_is_replaced(scratch):
    out = scratch["root"] / "empty"
    out.mkdir()
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("code, advice", [
    (errno.EROFS, "it is on a read-only file system: make it writable and run the same command again"),
    (errno.EBUSY, "the folder is busy (a mount point, or in use): free it and run the same command again"),
])
def test_a_read_only_or_busy_out_is_not_called_a_full_disk(scratch, baked, monkeypatch, code, advice):
    old = snapshot(baked)
    real = os.replace

    def replace(src, dst):
        if Path(src) == baked:  # moving the finished output aside
            raise OSError(code, os.strerror(code))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], baked, "--overwrite", "--force"))  # same settings: --force bakes again
    assert result.exit_code == 3
    work = baked.parent / "baked.work"
    assert last_line(result) == (f"error: can't write --out {baked} ({os.strerror(code)}); it was left as it was. The "
                                 f"trained adapter is kept in {work}: {advice}.")
    assert snapshot(baked) == old
    assert [p.name for p in baked.parent.iterdir() if p.name.startswith(".")] == []  # no empty .baked.old-*


def test_disk_full_while_the_tokenizer_is_saved_is_a_write_error(scratch, monkeypatch):
    """A real ENOSPC: the staging folder's tokenizer.json is a link to /dev/full, so the tokenizers library's
    own write fails the way it does on a full disk (a bare Exception, '... (os error 28)')."""
    import promptbake.finish
    from promptbake.output import make_staging

    def staging_on_a_full_disk(out):
        folder = make_staging(out)
        (folder / "tokenizer.json").symlink_to("/dev/full")
        return folder

    monkeypatch.setattr(promptbake.finish, "make_staging", staging_on_a_full_disk)
    out = scratch["root"] / "baked"
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out))
    assert result.exit_code == 3, result.output
    work = out.parent / "baked.work"
    assert last_line(result) == (f"error: can't write --out {out} (No space left on device); it was left as it was. "
                                 f"The trained adapter is kept in {work}: free some space and run the same command "
                                 "again to finish without retraining.")
    assert not out.exists() and (work / f"step-{STEPS:06d}.pt").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".baked")] == []


def test_brackets_in_a_message_are_printed_as_they_are(scratch):
    checks = scratch["root"] / "empty.checks.toml"
    checks.write_text("# nothing yet\n")
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], scratch["root"] / "baked", "--eval",
                      "--checks", checks))
    assert result.exit_code == 2
    assert result.output == (f"error: checks file {checks} holds no [[check]] tables; see prompts/README.md for the "
                             "format.\n")


def test_rich_markup_in_a_path_is_printed_as_it_is(scratch):
    missing = scratch["root"] / "[bold]x[/bold] holds no [] tables.txt"
    result = run(args(scratch["model"], missing, scratch["prompts"], scratch["root"] / "baked"))
    assert result.exit_code == 2
    assert result.output == f"error: system prompt file {missing} does not exist.\n"


# ---------------------------------------------------------------- one bake per output


def test_two_bakes_on_one_output_exactly_one_bakes(scratch):
    out = scratch["root"] / "baked"
    steps = 12
    argv = [sys.executable, "-m", "promptbake.cli",
            *args(scratch["model"], scratch["system"], scratch["prompts"], out, steps=steps)[:], "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    procs = [subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)][1]
    lines = loser.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out} is being baked by process "), loser
    assert lines[0].endswith(f"(lock {out.parent / '.baked.lock'}); wait for it to finish, or choose another --out.")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert json.loads((out / "promptbake.json").read_text())["results"]["steps"] == steps
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith((".baked", "baked"))) == ["baked"]


def test_a_stale_lock_and_partial_folder_are_cleaned(scratch):
    out = scratch["root"] / "baked"
    lock = out.parent / ".baked.lock"
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-12-01T09:00:00Z"}))
    partial = out.parent / ".baked.partial-k1ll3d_9"
    finished_output(partial)  # a whole model copy, left by a kill during the closing evaluation
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (f"note: took over the lock {lock} from process 999999 on gone, started 2026-12-01T09:00:00Z, which is "
            "no longer running.") in text
    assert (f"note: removed 1 unfinished output folder left beside {out} by a bake that was stopped "
            f"({partial.name}).") in text
    assert not partial.exists() and not lock.exists()


# ---------------------------------------------------------------- resume and the model's identity


def stopped_bake(scratch, monkeypatch, out: Path):
    """A bake stopped by Ctrl-C after its step-1 checkpoint."""
    from promptbake.pair import StudentTeacher

    original = StudentTeacher.student_states
    calls = {"n": 0}

    def stop_at_step_2(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(StudentTeacher, "student_states", stop_at_step_2)
        result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--save-every", "1"))
    assert result.exit_code == 130, result.output
    assert (out.parent / "baked.work" / "step-000001.pt").exists()


@pytest.mark.parametrize("change, named", [
    ("weights", "the --model weights changed (a weights file's size or modification time)"),
    ("template", "the --model chat template changed"),
    ("tokenizer", "the --model tokenizer files changed"),
])
def test_resume_after_the_model_changed_at_the_same_path_is_refused(scratch, monkeypatch, change, named):
    out = scratch["root"] / "baked"
    stopped_bake(scratch, monkeypatch, out)
    model = scratch["model"]
    if change == "weights":
        st = (model / "model.safetensors").stat()
        os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "template":
        (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + " ")
    else:
        spec = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**spec, "model_max_length": 77}))
    work = out.parent / "baked.work"
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--save-every", "1"))
    assert result.exit_code == 2
    assert result.output == (f"error: {work} holds a stopped bake with other settings: {named}. Resume "
                             f"with the same settings, or delete {work} to start afresh.\n")
    assert (work / "step-000001.pt").exists()


def test_resume_with_an_unchanged_model_continues(scratch, monkeypatch):
    out = scratch["root"] / "baked"
    stopped_bake(scratch, monkeypatch, out)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--save-every", "1"))
    assert result.exit_code == 0, result.output
    assert "resuming the stopped bake" in result.output


# ---------------------------------------------------------------- templates and options checked before training


def test_a_template_that_ignores_the_messages_is_refused_before_training(scratch):
    template = scratch["root"] / "fixed.jinja"
    template.write_text("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    out = scratch["root"] / "baked"
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], out, "--chat-template", template))
    assert result.exit_code == 2
    assert result.output.startswith(f"error: --chat-template {template} renders a conversation to the same tokens "
                                    "with and without the system prompt")
    assert not out.exists() and not (out.parent / "baked.work").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--kl-topk", "100000"],
     "error: --kl-topk 100000 is larger than the vocabulary (400 tokens); use 0 for exact KL."),
    (["--lora-targets", "q_proj,qkv_proj"],
     "error: --lora-targets q_proj,qkv_proj: the model has no layer named 'qkv_proj'; "),
])
def test_options_the_config_can_refute_are_refused_before_the_weights_load(scratch, monkeypatch, extra, expected):
    import promptbake.models

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(promptbake.models, "load_model", no_weights)
    import promptbake.setup

    monkeypatch.setattr(promptbake.setup, "load_model", no_weights)
    result = run(args(scratch["model"], scratch["system"], scratch["prompts"], scratch["root"] / "baked", *extra))
    assert result.exit_code == 2
    assert last_line(result).startswith(expected), result.output


# ---------------------------------------------------------------- eval and chat check the bake's record


@pytest.mark.parametrize("command", ["eval", "chat"])
def test_eval_and_chat_refuse_another_base_or_prompt_unless_forced(scratch, baked, tmp_path, tiny_model, command):
    other_model = tmp_path / "other"
    shutil.copytree(tiny_model, other_model)
    (other_model / "config.json").write_text(json.dumps({**json.loads((other_model / "config.json").read_text()),
                                                         "rms_norm_eps": 1e-3}))
    other_prompt = tmp_path / "other.txt"
    other_prompt.write_text("Talk like a cat.")
    common = ["--max-new-tokens", "4"] + (["--max-prompts", "2"] if command == "eval" else ["--message", "Hi"])
    head = [command, baked] if command == "chat" else [command, "--baked", baked]

    result = run([*head, "--model", other_model, "--prompt", other_prompt, *common])
    assert result.exit_code == 2
    line = last_line(result)
    what = "baked folder" if command == "chat" else "--baked"
    assert line.startswith(f"error: {what} {baked} doesn't match: --model {other_model} is not the bake's base "
                           f"{scratch['model']}; --prompt is not the prompt baked in")
    assert line.endswith("Pass the --model and --prompt the bake was made from, or --force to compare them anyway.")

    forced = run([*head, "--model", other_model, "--prompt", other_prompt, *common, "--force"])
    assert forced.exit_code in (0, 4), forced.output
    assert "note: comparing anyway (--force)" in " ".join(forced.output.split())


def test_eval_refuses_a_baked_model_whose_tokenizer_differs(scratch, baked):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(baked)
    tok.add_tokens(["<not-in-the-base>"])
    tok.save_pretrained(baked)
    result = run(["eval", "--baked", baked, "--model", scratch["model"], "--prompt", scratch["system"],
                  "--max-prompts", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 2
    size = len(tok)
    assert last_line(result) == (
        f"error: the tokenizer of --baked {baked} differs from that of --model {scratch['model']} ({size} tokens vs "
        f"{size - 1}), so their answers can't be scored against each other. Pass the --model the bake was made "
        "from, or --force to compare them anyway.")
