"""Behaviour checks: every rule on hand-written responses, the bundled files, and bad files."""

from pathlib import Path

import pytest

from promptbake.checks import find_checks, load_checks, parse_checks, sibling_checks
from promptbake.data import bundled_dir
from promptbake.errors import InputError


def one(**table):
    return parse_checks({"check": [{"name": "c", **table}]}, "x.toml")[0]


@pytest.mark.parametrize("table, passing, failing", [
    ({"contains_any": ["arr", "matey"]}, "Arr, matey!", "Arr, Matey!"),
    ({"contains_any": ["arr", "matey"], "ignore_case": True}, "ARR!", "Hello there."),
    ({"contains_all": ["<answer>", "</answer>"]}, "x <answer>4</answer>", "x <answer>4"),
    ({"not_contains": ["As an AI", "sorry"]}, "Here you go.", "I'm sorry, I can't."),
    ({"not_contains": ["sorry"], "ignore_case": True}, "Fine.", "SORRY."),
    ({"regex": r"\bye\b"}, "Ahoy, ye landlubber", "yes, eye, layer"),
    ({"regex": r"\bye\b", "ignore_case": True}, "YE be warned", "yes"),
    ({"not_regex": r"\d"}, "no digits here", "room 101"),
    ({"starts_with": "Answer:"}, "  Answer: 4\n", "The Answer: 4"),
    ({"starts_with": "answer:", "ignore_case": True}, "ANSWER: 4", "4"),
    ({"ends_with": "Lumora Support"}, "Thanks!\n— Lumora Support  \n", "Lumora Support, thanks"),
    ({"ends_with": "lumora support", "ignore_case": True}, "- Lumora Support", "Bye"),
    ({"json": True}, ' {"a": 1} ', '```json\n{"a": 1}\n```'),
    ({"json": True}, '{"a": [1, 2]}', "[1, 2]"),
    ({"json": True, "json_keys": ["answer", "confidence"]}, '{"answer": "x", "confidence": 0.9}', '{"answer": "x"}'),
    ({"max_words": 3}, " one two  three ", "one two three four"),
    ({"max_chars": 5}, "  hello  ", "hello!"),
])
def test_each_rule_passes_and_fails(table, passing, failing):
    check = one(**table)
    assert check.passes(passing)
    assert not check.passes(failing)


def test_bundled_checks_load_and_tell_following_from_ignoring():
    system = bundled_dir() / "system"
    follows = {
        "pirate": ("Arr, matey! Popcorn pops because water turns to steam.", "Popcorn pops because water turns to steam."),
        "concise": ("Steam builds up inside the kernel.", " ".join(["lengthy"] * 60)),
        "json": ('{"answer": "steam", "confidence": 0.9}', "Steam, I think."),
        "support": ("Try restarting it.\n\n— Lumora Support", "Try restarting it."),
        "expert": ("Water turns to steam.\n<answer>steam</answer>", "Water turns to steam."),
        "french": ("Le maïs éclate parce que l'eau devient vapeur, c'est simple.", "Popcorn pops because of steam."),
    }
    for name, (good, bad) in follows.items():
        checks = load_checks(system / f"{name}.checks.toml")
        assert checks, name
        assert all(c.passes(good) for c in checks), name
        assert not any(c.passes(bad) for c in checks), name


def test_sibling_checks_are_found(tmp_path):
    prompt = tmp_path / "pirate.txt"
    prompt.write_text("Talk like a pirate.")
    assert sibling_checks(prompt) == tmp_path / "pirate.checks.toml"
    assert find_checks(None, prompt) == []
    (tmp_path / "pirate.checks.toml").write_text('[[check]]\nname = "p"\ncontains_any = ["arr"]\n')
    assert [c.name for c in find_checks(None, prompt)] == ["p"]


def write(tmp_path, text) -> Path:
    path = tmp_path / "bad.checks.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, problem", [
    ('name = "a"\ncontains = ["x"]', "check 'a': unknown rule 'contains' (rules: contains_any, contains_all,"),
    ('name = "a"\nregex = "(unclosed"', "check 'a': regex '(unclosed' is not a valid regular expression (missing ),"),
    ('name = "a"\nmax_words = "ten"', "check 'a': max_words must be a positive integer (got 'ten')."),
    ('name = "a"\nmax_chars = 0', "check 'a': max_chars must be a positive integer (got 0)."),
    ('name = "a"\nmax_words = true', "check 'a': max_words must be a positive integer (got True)."),
    ('name = "a"\ncontains_any = "arr"', "check 'a': contains_any must be a list of strings (got 'arr')."),
    ('name = "a"\ncontains_all = []', "check 'a': contains_all must be a list of strings (got [])."),
    ('name = "a"\njson = false', "check 'a': json must be true (got False)."),
    ('name = "a"\nregex = "x"\nignore_case = "yes"', "check 'a': ignore_case must be true or false (got 'yes')."),
    ('name = "a"\nregex = "x"\njson_keys = ["k"]', "check 'a': json_keys only goes with json = true."),
    ('name = "a"\njson = true\njson_keys = "k"', "check 'a': json_keys must be a list of strings (got 'k')."),
    ('name = "a"\nregex = "x"\nmax_words = 3', "check 'a': needs exactly one rule key (found regex, max_words)."),
    ('name = "a"\ndescription = "no rule"', "check 'a': needs exactly one rule key (found none)."),
    ('regex = "x"', "check 1: needs a non-empty string 'name'."),
])
def test_bad_check_names_file_check_and_problem(tmp_path, body, problem):
    path = write(tmp_path, f"[[check]]\n{body}\n")
    with pytest.raises(InputError) as err:
        load_checks(path)
    assert str(err.value).startswith(f"checks file {path}, {problem}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, problem", [
    ('[[check]]\nname = "a"\nregex = "x"\n[[check]]\nname = "a"\nregex = "y"\n',
     ": the name 'a' is used twice; names must be unique."),
    ('title = "x"\n', ": unknown top-level key 'title'; write each check as a [[check]] table."),
    ("# nothing\n", " holds no [[check]] tables; see prompts/README.md for the format."),
    ("[[check]\nname = 1\n", " is not valid TOML: "),
])
def test_bad_checks_file(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_checks(path)
    assert str(err.value).startswith(f"checks file {path}{problem}")


def test_missing_checks_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_checks(tmp_path / "nope.toml")
