"""Behaviour checks: declarative rules a response must meet, read from a TOML file.

The format is documented in prompts/README.md: a list of `[[check]]` tables, each
with a `name`, exactly one rule key and optional `ignore_case` / `description`.
Pure Python (no torch): `promptbake eval` and `promptbake distill` load the file
before any model, so a typo costs a second, not a bake.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .data import read_text_file
from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# rule key -> the type its value must have (for the error message and the check itself)
RULES = {
    "contains_any": "a list of strings",
    "contains_all": "a list of strings",
    "not_contains": "a list of strings",
    "regex": "a string",
    "not_regex": "a string",
    "starts_with": "a string",
    "ends_with": "a string",
    "json": "true",
    "max_words": "a positive integer",
    "max_chars": "a positive integer",
}
OPTIONAL = {"name", "description", "ignore_case", "json_keys"}


@dataclass(frozen=True)
class Check:
    name: str
    rule: str  # one of RULES
    value: object  # list[str] | str | bool | int, as RULES says
    ignore_case: bool = False
    description: str = ""
    json_keys: tuple[str, ...] = ()
    _regex: re.Pattern | None = field(default=None, repr=False, compare=False)

    def passes(self, response: str) -> bool:
        """True if `response` meets the rule."""
        if self.rule in ("regex", "not_regex"):
            found = self._regex.search(response) is not None
            return found if self.rule == "regex" else not found
        text = response.strip()
        if self.rule == "json":
            try:
                obj = json.loads(text)
            except ValueError:
                return False
            return isinstance(obj, dict) and all(k in obj for k in self.json_keys)
        if self.rule == "max_words":
            return len(text.split()) <= self.value
        if self.rule == "max_chars":
            return len(text) <= self.value
        fold = str.casefold if self.ignore_case else (lambda s: s)
        text = fold(text)
        if self.rule == "starts_with":
            return text.startswith(fold(self.value))
        if self.rule == "ends_with":
            return text.endswith(fold(self.value))
        found = [fold(s) in text for s in self.value]
        if self.rule == "contains_any":
            return any(found)
        if self.rule == "contains_all":
            return all(found)
        return not any(found)  # not_contains


def load_checks(path: Path) -> list[Check]:
    """Read and validate a checks file; InputError naming the file, check and problem otherwise."""
    path = Path(path)
    text = read_text_file(path, "checks file")  # a regular file (never a pipe or a device), at most 1 MiB
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"checks file {path} is not valid TOML: {err}.") from None
    return parse_checks(data, str(path))


def parse_checks(data: dict, where: str) -> list[Check]:
    """Validate parsed TOML (`{"check": [ {...}, ... ]}`) into Checks."""
    extra = sorted(set(data) - {"check"})
    if extra:
        raise InputError(f"checks file {where}: unknown top-level key {extra[0]!r}; write each check as a [[check]] table.")
    tables = data.get("check")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"checks file {where} holds no [[check]] tables; see prompts/README.md for the format.")
    checks, seen = [], set()
    for n, table in enumerate(tables, start=1):
        check = _parse_one(table, where, n)
        if check.name in seen:
            raise InputError(f"checks file {where}: the name {check.name!r} is used twice; names must be unique.")
        seen.add(check.name)
        checks.append(check)
    return checks


def _parse_one(table: object, file: str, n: int) -> Check:
    if not isinstance(table, dict):
        raise InputError(f"checks file {file}, check {n}: write each check as a [[check]] table.")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"checks file {file}, check {n}: needs a non-empty string 'name'.")
    where = f"checks file {file}, check {name!r}"
    unknown = sorted(set(table) - set(RULES) - OPTIONAL)
    if unknown:
        raise InputError(f"{where}: unknown rule {unknown[0]!r} (rules: {', '.join(RULES)}).")
    rules = [k for k in table if k in RULES]
    if len(rules) != 1:
        found = f"found {', '.join(rules)}" if rules else "found none"
        raise InputError(f"{where}: needs exactly one rule key ({found}).")
    rule, value = rules[0], table[rules[0]]
    if not _value_ok(rule, value):
        raise InputError(f"{where}: {rule} must be {RULES[rule]} (got {value!r}).")
    ignore_case = table.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise InputError(f"{where}: ignore_case must be true or false (got {ignore_case!r}).")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"{where}: description must be a string (got {description!r}).")
    json_keys = table.get("json_keys", [])
    if "json_keys" in table and rule != "json":
        raise InputError(f"{where}: json_keys only goes with json = true.")
    if not (isinstance(json_keys, list) and all(isinstance(k, str) for k in json_keys)):
        raise InputError(f"{where}: json_keys must be a list of strings (got {json_keys!r}).")
    regex = None
    if rule in ("regex", "not_regex"):
        try:
            regex = re.compile(value, re.IGNORECASE if ignore_case else 0)
        except re.error as err:
            raise InputError(f"{where}: {rule} {value!r} is not a valid regular expression ({err}).") from None
    return Check(name, rule, tuple(value) if isinstance(value, list) else value, ignore_case, description,
                 tuple(json_keys), regex)


def _value_ok(rule: str, value: object) -> bool:
    kind = RULES[rule]
    if kind == "a list of strings":
        return isinstance(value, list) and bool(value) and all(isinstance(s, str) and s for s in value)
    if kind == "a string":
        return isinstance(value, str) and bool(value)
    if kind == "true":
        return value is True
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def sibling_checks(prompt: Path) -> Path:
    """Where a system prompt's own checks live: pirate.txt -> pirate.checks.toml."""
    prompt = Path(prompt)
    return prompt.with_name(prompt.stem + ".checks.toml")


def find_checks(checks: Path | None, prompt: Path) -> list[Check]:
    """The checks to run: --checks if given, else the prompt's sibling file if there is one, else none."""
    if checks is not None:
        return load_checks(checks)
    sibling = sibling_checks(prompt)
    return load_checks(sibling) if sibling.is_file() else []


def checks_for(checks: Path | None, prompt: Path, min_pass_rate: float | None) -> list[Check]:
    """`find_checks`, and an error when --min-pass-rate is set but there is nothing to gate on."""
    found = find_checks(checks, prompt)
    if min_pass_rate is not None and not found:
        raise InputError(f"--min-pass-rate needs checks: give --checks FILE or put "
                         f"{Path(prompt).stem}.checks.toml beside {prompt}.")
    return found
