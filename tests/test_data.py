"""Prompt sets: every source format, multi-turn rendering, filters, bundled sets and their checks files."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptbake.data import PromptSet, bundled_dir, load_prompt_set, load_prompts
from promptbake.errors import ContextTooLongError, InputError
from tiny import CHATML, NO_SYSTEM, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Why is the sky blue?", "Write a short poem about the sea.", "How do I sort a list in Python?"]
EXPECTED = [[{"role": "user", "content": p}] for p in PROMPTS]
CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Why is the sky blue?"},
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- Every source format gives the same prompts. ---


def test_every_source_format_gives_the_same_prompts(tmp_path):
    import datasets

    rows = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\n" + "\n".join(f"  {p}  " for p in PROMPTS) + "\n\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8")
    table = datasets.Dataset.from_list(rows)
    table.to_csv(tmp_path / "p.csv", index=False)
    table.to_parquet(tmp_path / "p.parquet")
    table.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": table}).save_to_disk(tmp_path / "dict")

    sources = [txt, jsonl, tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "p.parquet", tmp_path / "saved"]
    for source in sources:
        assert load_prompts(str(source)) == EXPECTED, source
    assert load_prompts(str(tmp_path / "dict"), split="test") == EXPECTED
    assert load_prompts(str(tmp_path / "dict")) == EXPECTED[:1]  # split defaults to train


def test_prompt_field_picks_the_column(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": p, "a": "x"} for p in PROMPTS]).to_csv(tmp_path / "qa.csv", index=False)
    assert load_prompts(str(tmp_path / "qa.csv"), prompt_field="q") == EXPECTED
    write_jsonl(tmp_path / "qa.jsonl", [{"question": p} for p in PROMPTS])
    assert load_prompts(str(tmp_path / "qa.jsonl"), prompt_field="question") == EXPECTED


def test_messages_in_jsonl_json_and_saved_folder(tmp_path):
    import datasets

    rows = [{"messages": CHAT}, {"messages": user("Write a haiku.")}]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    (tmp_path / "chat.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "chat")
    for source in ("chat.jsonl", "chat.json", "chat"):
        assert load_prompts(str(tmp_path / source)) == [CHAT, user("Write a haiku.")], source


# --- Multi-turn rendering, on token ids. ---


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM], ids=["chatml", "no-system-role"])
def test_multi_turn_student_and_teacher_ids(tmp_path, template):
    from promptbake.render import Renderer

    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    [messages] = load_prompts(str(tmp_path / "chat.jsonl"))
    tok = build_tokenizer(template)
    renderer = Renderer(tok, "Talk like a pirate.")

    def turn(role, text):
        return f"<|im_start|>{role}\n{text}<|im_end|>\n"

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    rest = turn("assistant", "Hello! How can I help?") + turn("user", "Why is the sky blue?") + "<|im_start|>assistant\n"
    # The student: the template applied to the conversation alone.
    assert renderer.student_ids(messages) == ids(turn("user", "Hi there") + rest)
    if template == CHATML:  # the teacher: the template applied to [system] + the conversation
        assert renderer.system_role
        assert renderer.teacher_ids(messages) == ids(turn("system", "Talk like a pirate.") + turn("user", "Hi there") + rest)
    else:  # no system role: the system prompt opens the first user turn
        assert not renderer.system_role
        assert renderer.teacher_ids(messages) == ids(turn("user", "Talk like a pirate.\n\nHi there") + rest)


# --- Filters: empty rows, duplicates, shuffling, --max-prompts, context length. ---


def test_empty_rows_and_duplicates_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "Why is the sky blue?"}, {"prompt": "  why is the sky blue?"}, {"prompt": "   "},
            {"prompt": "Why is  the sky\tblue? "}, {"prompt": None}, {"messages": user("Why is the sky blue?")},
            {"messages": [*CHAT[:2], *user("Why is the sky blue?")]}]
    ps = load_prompt_set(str(write_jsonl(tmp_path / "p.jsonl", rows)), seed=None)
    # Case differs, so the second is kept; whitespace alone doesn't make a new prompt; a multi-turn
    # conversation ending in the same question is a different prompt.
    assert ps.prompts == [user("Why is the sky blue?"), user("why is the sky blue?"),
                          [*CHAT[:2], *user("Why is the sky blue?")]]
    assert (ps.rows, ps.dropped) == (7, {"empty": 2, "duplicate": 2})
    assert ps.describe() == f"3 prompts from {tmp_path / 'p.jsonl'} (7 read; dropped: 2 empty, 2 duplicated)"


def test_shuffle_is_deterministic_and_max_prompts_samples_after_it(tmp_path):
    txt = tmp_path / "many.txt"
    txt.write_text("\n".join(f"prompt number {i}" for i in range(50)), encoding="utf-8")
    in_order = load_prompt_set(str(txt), seed=None).prompts
    assert in_order == [user(f"prompt number {i}") for i in range(50)]
    a, b, c = (load_prompt_set(str(txt), seed=s).prompts for s in (1, 1, 2))
    assert a == b and a != c and a != in_order
    assert sorted(map(str, a)) == sorted(map(str, in_order))

    capped = load_prompt_set(str(txt), seed=1, max_prompts=10)
    assert capped.prompts == a[:10]
    assert capped.dropped == {"beyond_max_prompts": 40}
    assert load_prompt_set(str(txt), seed=1, max_prompts=50).dropped == {}


def test_prompts_too_long_for_the_context_are_dropped_and_counted():
    from promptbake.setup import fit_context
    from promptbake.render import Renderer

    renderer = Renderer(build_tokenizer(CHATML), "Be brief.")
    short, long = user("Why is the sky blue?"), user("Why is the sky blue? " * 40)
    ps = PromptSet("test", [short, long, short], rows=4, dropped={"duplicate": 1})
    ctx = len(renderer.teacher_ids(short)) + 16  # room for 16 new tokens after the short prompt only
    kept = fit_context(ps, renderer, ctx, max_new=16)
    assert kept.prompts == [short, short]
    assert kept.dropped == {"duplicate": 1, "too_long": 1}
    assert kept.describe() == "2 prompts from test (4 read; dropped: 1 duplicated, 1 too long for the context)"
    assert fit_context(ps, renderer, None, max_new=16) is ps  # unknown context: nothing to check

    with pytest.raises(ContextTooLongError, match=r"^all 2 prompts are too long for the context of"):
        fit_context(PromptSet("test", [long, long], rows=2), renderer, ctx, max_new=16)


# --- Bad input: one clear message naming the row, line or field. ---


def test_missing_field_lists_the_fields_there_are(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "a", "answer": "b"}]).to_csv(tmp_path / "qa.csv", index=False)
    with pytest.raises(InputError) as err:
        load_prompt_set(str(tmp_path / "qa.csv"))
    assert str(err.value) == (f"{tmp_path / 'qa.csv'}: no field 'prompt' (fields present: q, answer); "
                              "choose one with --prompt-field NAME.")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt here", "id": 2}])
    with pytest.raises(InputError, match=r"p\.jsonl, line 2: no field 'prompt' \(fields present: text, id\)"):
        load_prompt_set(str(tmp_path / "p.jsonl"))


def test_bad_messages_name_the_row(tmp_path):
    system = [{"role": "system", "content": "Be nice."}, *user("hi")]
    write_jsonl(tmp_path / "sys.jsonl", [{"prompt": "ok"}, {"prompt": "fine"}, {"messages": system}])
    with pytest.raises(InputError) as err:
        load_prompt_set(str(tmp_path / "sys.jsonl"))
    assert str(err.value) == (f"{tmp_path / 'sys.jsonl'}, line 3: has a system message, which would conflict "
                              "with the baked prompt; remove it.")

    tool = [*user("hi"), {"role": "tool", "content": "42"}, *user("and?")]
    (tmp_path / "tool.json").write_text(json.dumps([{"messages": user("ok")}, {"messages": tool}]), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_prompt_set(str(tmp_path / "tool.json"))
    assert str(err.value) == f"{tmp_path / 'tool.json'}, row 2: unknown role 'tool' (expected user or assistant)."

    write_jsonl(tmp_path / "last.jsonl", [{"messages": CHAT[:2]}])
    with pytest.raises(InputError, match=r"line 1: the last message must be a user turn"):
        load_prompt_set(str(tmp_path / "last.jsonl"))


def test_a_set_with_nothing_left_says_what_was_dropped(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [{"prompt": ""}, {"prompt": "  "}, {"prompt": None}])
    with pytest.raises(InputError) as err:
        load_prompt_set(str(tmp_path / "empty.jsonl"))
    assert str(err.value) == f"prompt set {tmp_path / 'empty.jsonl'} yields no prompts: 3 read, dropped: 3 empty."
    (tmp_path / "comments.txt").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"comments\.txt holds no prompts\.$"):
        load_prompt_set(str(tmp_path / "comments.txt"))


def test_unknown_sources_and_types(tmp_path):
    with pytest.raises(InputError, match=r"^prompt set 'defualt' not found: give a file path, a bundled set "):
        load_prompt_set("defualt")
    with pytest.raises(InputError, match=r"^prompt set 'data/missing\.csv' not found"):
        load_prompt_set("data/missing.csv")
    (tmp_path / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.md: unsupported file type \.md; use \.txt, \.jsonl, \.json, "):
        load_prompt_set(str(tmp_path / "notes.md"))
    with pytest.raises(InputError, match=r"is a folder but not a dataset saved with save_to_disk"):
        load_prompt_set(str(tmp_path))
    (tmp_path / "broken.json").write_text('[{"prompt": "a"}, {"prompt": ', encoding="utf-8")
    with pytest.raises(InputError, match=r"^can't read .*broken\.json as json: "):
        load_prompt_set(str(tmp_path / "broken.json"))
    with pytest.raises(InputError, match=r"^--max-prompts must be 0 \(all\) or a positive number \(got -1\)\.$"):
        load_prompt_set("default", max_prompts=-1)


def test_missing_split_lists_the_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}])}).save_to_disk(tmp_path / "d")
    with pytest.raises(InputError) as err:
        load_prompt_set(str(tmp_path / "d"), split="validation")
    assert str(err.value) == (f"dataset {tmp_path / 'd'} has no split 'validation'; its splits are train. "
                              "Choose one with --split NAME.")


def test_hub_dataset_fails_fast_when_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as err:
        load_prompt_set("promptbake-test/no-such-dataset")
    assert str(err.value) == ("dataset promptbake-test/no-such-dataset is not in the local Hugging Face cache and "
                              "HF_HUB_OFFLINE=1; pass a local file or save_to_disk folder instead.")

    # Not marked offline but unreachable (a name that never resolves): the same fast refusal.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.promptbake.invalid")
    with pytest.raises(InputError, match=r"^can't reach hub\.promptbake\.invalid to download dataset "
                                         r"promptbake-test/no-such-dataset, and it is not in the local cache"):
        load_prompt_set("promptbake-test/no-such-dataset")


# --- The bundled sets and example system prompts. ---


def normalised(prompts) -> set[str]:
    return {" ".join(m[-1]["content"].lower().split()) for m in prompts}


def test_bundled_sets_have_their_sizes_and_default_shares_nothing_with_eval():
    sizes = {name: len(load_prompts(name)) for name in ("default", "eval", "ood")}
    assert sizes["default"] >= 400 and sizes["eval"] >= 100 and sizes["ood"] >= 100, sizes
    assert not normalised(load_prompts("default")) & normalised(load_prompts("eval"))
    for name in ("default", "eval", "ood"):  # none is dropped as empty or duplicated
        assert load_prompt_set(name).dropped == {}, name


def test_bundled_sets_load_from_an_installed_package(tmp_path):
    # Install a copy of the project (not the source tree, so no build files land in it) into a
    # target folder, then load `default` in a fresh interpreter that can only see that folder's copy.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("promptbake", "prompts"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(site),
                    str(src)], check=True, capture_output=True, timeout=120)
    shutil.rmtree(src)  # nothing left to import from but the installed copy

    code = ("import promptbake; from promptbake.data import bundled_dir, load_prompt_set; "
            "print(promptbake.__file__); print(bundled_dir()); print(len(load_prompt_set('default')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    module, folder, count = out.stdout.split("\n")[:3]
    assert module.startswith(str(site)) and folder.startswith(str(site))
    assert int(count) == len(load_prompts("default"))
    assert sorted(p.name for p in (Path(folder) / "system").iterdir()) == sorted(
        p.name for p in (REPO / "prompts" / "system").iterdir())


# A plain answer that ignores every example system prompt: no pirate words, no JSON, no answer tag,
# no sign-off, no French, and longer than "concise" allows.
PLAIN = ("Paris is the capital of France. It has been the country's political and cultural centre for "
         "centuries, and today it is home to the national government, the president's official residence, "
         "and many of the most visited museums in the world, including the Louvre and the Musée d'Orsay, "
         "which together draw millions of visitors every single year.")
RULES = {"contains_any", "contains_all", "not_contains", "regex", "not_regex", "starts_with", "ends_with", "json",
         "max_words", "max_chars"}
OPTIONAL = {"name", "description", "ignore_case", "json_keys"}


def passes(check: dict, text: str) -> bool | None:
    """A minimal reading of the rules the examples use (promptbake.checks is the real evaluator)."""
    flags = re.I if check.get("ignore_case") else 0
    fold = (lambda s: s.lower()) if check.get("ignore_case") else (lambda s: s)
    if "regex" in check:
        return re.search(check["regex"], text, flags) is not None
    if "contains_any" in check:
        return any(fold(s) in fold(text) for s in check["contains_any"])
    if "ends_with" in check:
        return fold(text.strip()).endswith(fold(check["ends_with"]))
    if "max_words" in check:
        return len(text.split()) <= check["max_words"]
    if "max_chars" in check:
        return len(text.strip()) <= check["max_chars"]
    if "json" in check:
        try:
            return isinstance(json.loads(text.strip()), dict)
        except json.JSONDecodeError:
            return False
    return None  # a rule this reading doesn't cover


def test_every_example_system_prompt_has_checks_that_a_plain_answer_fails():
    tomllib = pytest.importorskip("tomllib")
    prompts = sorted((bundled_dir() / "system").glob("*.txt"))
    assert [p.stem for p in prompts] == ["concise", "expert", "french", "json", "pirate", "spanish", "support"]
    for path in prompts:
        checks = tomllib.loads(path.with_name(f"{path.stem}.checks.toml").read_text(encoding="utf-8"))["check"]
        names = [c["name"] for c in checks]
        assert len(names) == len(set(names)), path
        for c in checks:
            assert len(set(c) & RULES) == 1 and not set(c) - RULES - OPTIONAL, (path.stem, c)
        assert any(passes(c, PLAIN) is False for c in checks), f"{path.stem}: a plain answer passes every check"
