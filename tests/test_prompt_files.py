"""Prompt files are regular files of bounded size: a FIFO, /dev/zero or a huge file is one clear error."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from promptbake.cli import app
from promptbake.data import (PROMPT_FILE_LIMIT, SYSTEM_PROMPT_LIMIT, load_prompt_set, read_system_prompt,
                             read_text_file)
from promptbake.errors import InputError


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (a FIFO with no writer) fails the test after 120 s instead of hanging the suite."""
    def hung(signum, frame):
        raise AssertionError("reading blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "sys.txt"
    os.mkfifo(fifo)
    with pytest.raises(InputError) as err:
        read_system_prompt(fifo)
    assert str(err.value) == (f"system prompt file {fifo} is a named pipe (FIFO); give a regular file (promptbake "
                              "reads it whole, so it can't be a pipe or a device).")
    with pytest.raises(InputError, match="prompt set .* is a named pipe"):
        load_prompt_set(str(fifo))


@pytest.mark.parametrize("reader", ["system prompt", "txt prompt set", "jsonl prompt set", "csv prompt set"])
def test_dev_zero_is_refused_not_read(tmp_path, reader):
    link = tmp_path / f"zero.{reader.split()[0]}"
    link.symlink_to("/dev/zero")
    with pytest.raises(InputError, match=r"is a device; give a regular file"):
        read_system_prompt(link) if reader == "system prompt" else load_prompt_set(str(link))


def test_a_system_prompt_over_the_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "sys.txt"
    with open(path, "wb") as f:
        f.truncate(SYSTEM_PROMPT_LIMIT + 1)  # sparse: nothing is written or read
    with pytest.raises(InputError) as err:
        read_system_prompt(path)
    assert str(err.value) == (f"system prompt file {path} is over 1 MiB, above the 1 MiB limit for it. Check that "
                              "the path names the right file.")
    path.write_text("x" * SYSTEM_PROMPT_LIMIT)
    assert len(read_system_prompt(path)) == SYSTEM_PROMPT_LIMIT  # the limit itself is allowed


def test_a_prompt_file_over_the_limit_is_refused_before_reading(tmp_path):
    for name in ("prompts.txt", "prompts.parquet"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(PROMPT_FILE_LIMIT + (5 << 20))
        with pytest.raises(InputError) as err:
            load_prompt_set(str(path))
        assert str(err.value) == (f"prompt set {path} is over 261 MiB, above the 256 MiB limit for it. Give a "
                                  "shorter file, or a save_to_disk folder or hub dataset for a bigger prompt set.")


def test_read_text_file_names_an_unreadable_or_dangling_path(tmp_path):
    (tmp_path / "gone.jinja").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"--chat-template .*gone.jinja does not exist"):
        read_text_file(tmp_path / "gone.jinja", "--chat-template")
    (tmp_path / "t.jinja").write_bytes(b"\xff{{ x }}")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_text_file(tmp_path / "t.jinja", "--chat-template")


def test_a_corrupt_parquet_prints_only_the_error(tmp_path, capfd):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1" + os.urandom(200))
    with pytest.raises(InputError, match=f"can't read {path} as parquet: "):
        load_prompt_set(str(path))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # datasets logged "Failed to read schema from ..." before the error


@pytest.mark.parametrize("flag", ["--prompt", "--prompts"])
def test_distill_with_a_fifo_or_device_is_one_error_line(tiny_model, prompt_files, tmp_path, flag):
    system, prompts = prompt_files
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    args = {"--prompt": str(system), "--prompts": str(prompts), flag: str(fifo)}
    result = CliRunner().invoke(app, ["distill", "--model", str(tiny_model), *[x for kv in args.items() for x in kv],
                                      "--out", str(tmp_path / "baked")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "named pipe (FIFO)" in result.output and not (tmp_path / "baked").exists()


def test_a_bundled_chat_template_is_found_by_name_and_a_missing_one_lists_them(tmp_path, monkeypatch):
    from promptbake.data import bundled_dir
    from promptbake.setup import read_template

    monkeypatch.chdir(tmp_path)  # outside a clone: no prompts/templates folder here
    assert read_template(Path("gemma3")) == (bundled_dir() / "templates" / "gemma3.jinja").read_text(encoding="utf-8")
    assert "<start_of_turn>" in read_template(Path("gemma3"))
    with pytest.raises(InputError) as err:
        read_template(Path("nosuch"))
    assert str(err.value) == "--chat-template nosuch does not exist (bundled templates, by name: gemma3)."
    (tmp_path / "gemma3").write_text("{{ messages }}", encoding="utf-8")  # a file of that name wins
    assert read_template(Path("gemma3")) == "{{ messages }}"
