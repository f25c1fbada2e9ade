"""Property: whatever files, option values and --out a user gives `distill`, the answer is a finished bake or one
clean `error:` line with a non-zero exit: never a traceback, never a half-written output, never a lost file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from promptbake.cli import app
from tiny import CHATML

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)  # any encodable text
NORMAL = ["Why is the sky blue?", "Say hello.", "Write a poem.", "What is a fox?", "# a comment", "", "   "]
lines = st.one_of(text, st.sampled_from(NORMAL))
txt_file = st.one_of(st.lists(st.sampled_from(NORMAL), max_size=14), st.lists(lines, max_size=14)).map("\n".join)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=5)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                 "content": st.one_of(text, st.integers())})
jsonl_row = st.one_of(
    st.fixed_dictionaries({"prompt": st.one_of(text, st.just("What is a fox?"), st.integers())}).map(json.dumps),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}).map(json.dumps),
    json_value.map(json.dumps),
    lines,  # not JSON at all
)
jsonl_file = st.lists(jsonl_row, max_size=14).map("\n".join)
good_txt = st.lists(st.sampled_from(NORMAL), min_size=8, max_size=14).map("\n".join)
good_jsonl = st.lists(st.sampled_from(NORMAL[:4]).map(lambda p: json.dumps({"prompt": p})), min_size=6, max_size=10)
# Weighted towards valid inputs, so that many examples get as far as a real (one-step) bake.
prompt_set = st.sampled_from(["good txt", "good txt", "good jsonl", "txt", "jsonl", "bytes"]).flatmap(lambda kind: {
    "good txt": st.tuples(st.just(".txt"), good_txt.map(str.encode)),
    "good jsonl": st.tuples(st.just(".jsonl"), good_jsonl.map("\n".join).map(str.encode)),
    "txt": st.tuples(st.just(".txt"), txt_file.map(str.encode)),
    "jsonl": st.tuples(st.just(".jsonl"), jsonl_file.map(str.encode)),
    "bytes": st.tuples(st.sampled_from([".txt", ".jsonl", ".csv"]), st.binary(max_size=40)),  # often not UTF-8
}[kind])
system_prompt = st.sampled_from(["valid", "valid", "valid", "text", "bytes"]).flatmap(
    lambda kind: {"valid": st.just(b"Talk like a pirate."), "text": text.map(str.encode),
                  "bytes": st.binary(max_size=20)}[kind])
OPTIONS = {
    "--steps": st.integers(-1, 2),
    "--batch-size": st.integers(-1, 3),
    "--lr": st.sampled_from(["nan", "inf", "-1", "0", "0.001", "1e30"]),
    "--holdout": st.floats(-0.5, 1.5),
    "--max-new-tokens": st.integers(-1, 4),
    "--temperature": st.sampled_from(["-1", "0", "1", "nan"]),
    "--top-p": st.floats(-0.1, 1.5),
    "--lora-rank": st.integers(0, 4),
    "--lora-alpha": st.sampled_from(["0", "-1", "8", "nan"]),
    "--lora-dropout": st.floats(-0.2, 1.2),
    "--lora-targets": st.sampled_from(["all-linear", "q_proj", "q_proj,v_proj", "no_such_module", ","]),
    "--kl-topk": st.integers(-1, 3),
    "--chunk-size": st.integers(-1, 4),
    "--save-every": st.integers(-1, 3),
    "--rollout": st.sampled_from(["fast", "generate"]),
    "--chat-template": st.sampled_from(["missing.jinja", "empty.jinja", "broken.jinja", "chatml.jinja"]),
}
options = st.lists(st.one_of(*[st.tuples(st.just(k), v) for k, v in OPTIONS.items()]), max_size=3)
flags = st.lists(st.sampled_from(["--resume", "--no-prefix-reuse", "--record-prompt", "--overwrite"]),
                 unique=True, max_size=1)


# Where --out points, relative to the inputs and the working directory (tmp/work). Only the first
# three may ever bake; every other one must be refused with everything in its place.
OUT_RELATIONS = {
    "fresh": "{tmp}/baked", "fresh, nested": "{tmp}/new/deep/baked", "empty folder": "{tmp}/emptydir",
    "the model": "{tmp}/model", "inside the model": "{tmp}/model/baked", "holds the inputs": "{tmp}",
    "the system prompt file": "{tmp}/system.txt", "a folder of user files": "{tmp}/userdir",
    "a symlink to user files": "{tmp}/link", "the working directory": ".", "above it": "..",
    "the working directory, absolute": "{tmp}/work", "the working directory by ../work": "../work",
}
MAY_BAKE = ("fresh", "fresh, nested", "empty folder")
out_relation = st.sampled_from([*["fresh"] * 6, *OUT_RELATIONS])


def every_file(folder: Path) -> dict[str, bytes]:
    """Each file under `folder` (not following symlinks) and what it holds."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                found[str(path.relative_to(folder))] = path.read_bytes()
    return found


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt_set=prompt_set, system=system_prompt, options=options, flags=flags, relation=out_relation)
def test_any_input_gives_a_bake_or_one_error_line(tiny_model, prompt_set, system, options, flags, relation):
    check_one_bake(tiny_model, prompt_set, system, options, flags, relation)


GOOD_PROMPTS = (".txt", "\n".join(f"Tell me fact number {i} about the sea." for i in range(12)).encode())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relation=st.sampled_from(list(OUT_RELATIONS)), overwrite=st.booleans())
def test_any_out_gives_a_bake_or_a_refusal_that_loses_nothing(tiny_model, relation, overwrite):
    """Valid inputs, so that only --out decides: every relation is tried with and without --overwrite."""
    check_one_bake(tiny_model, GOOD_PROMPTS, b"Talk like a pirate.", [], ["--overwrite"] if overwrite else [],
                   relation)


def check_one_bake(tiny_model, prompt_set, system, options, flags, relation):
    suffix, content = prompt_set
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(tiny_model, tmp / "model")  # a copy: --out may point at it
        (tmp / f"prompts{suffix}").write_bytes(content)
        (tmp / "system.txt").write_bytes(system)
        (tmp / "empty.jinja").write_text("")
        (tmp / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
        (tmp / "chatml.jinja").write_text(CHATML)
        for folder in ("work", "userdir"):
            (tmp / folder).mkdir()
            (tmp / folder / "mine.txt").write_text(f"the user's file in {folder}")
        (tmp / "emptydir").mkdir()
        (tmp / "link").symlink_to(tmp / "userdir")
        before = every_file(tmp)
        out_arg = OUT_RELATIONS[relation].format(tmp=tmp)
        args = ["distill", "--model", str(tmp / "model"), "--prompt", str(tmp / "system.txt"),
                "--prompts", str(tmp / f"prompts{suffix}"), "--out", out_arg, "--steps", "1", "--batch-size", "2",
                "--max-new-tokens", "4"]
        for name, value in options:
            args += [name, str(tmp / value) if name == "--chat-template" else str(value)]
        cwd = os.getcwd()
        os.chdir(tmp / "work")
        try:
            result = CliRunner().invoke(app, [*args, *flags])
            out = Path(os.path.abspath(out_arg))
        finally:
            os.chdir(cwd)

        last = result.output.strip().splitlines()[-1] if result.output.strip() else ""
        said = "baked" if result.exit_code == 0 else " ".join(last.replace(str(tmp), "").split()[:9])
        event(f"exit {result.exit_code}: {said}")
        event(f"--out {relation}: exit {result.exit_code}")
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        after = every_file(tmp)
        assert {k: after.get(k) for k in before} == before  # nothing the user had is changed or gone
        if result.exit_code == 0:
            assert relation in MAY_BAKE, f"--out {relation} baked"
            assert (out / "model.safetensors").is_file() and not out.with_name(f"{out.name}.work").exists()
        else:
            assert result.exit_code in (2, 3), result.output
            assert last.startswith("error: "), result.output
            if relation.startswith("fresh"):
                assert not out.exists()
        beside = list(out.parent.iterdir()) if out.parent.is_dir() else []
        leftovers = [p for p in beside if p.name.startswith(f".{out.name}.")]
        assert leftovers == []  # no staging folder, no lock file
