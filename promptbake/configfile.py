"""`--config FILE`: settings from a TOML file, and the resolved settings a bake writes beside its output.

    model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # shared keys: every command that has the option takes them
    prompt = "prompts/support.txt"                  # relative paths resolve against this file's folder

    [distill]                                       # keys are option names: batch_size or batch-size
    out = "baked"
    steps = 30

    [eval]                                          # --baked defaults to [distill]'s out
    report = "report"
    min_gap_closed = 0.3

`distill` and `plan` read the top level and `[distill]`, `eval` reads `[eval]`, `chat` reads `[chat]`.
A flag on the command line overrides the file. Values are checked for type here and then by the
command's own `validate()`, the same checks a flag gets. No torch here: a bad file fails at once.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from .config import ChatConfig, DistillConfig, EvalConfig, flag
from .errors import InputError

TABLES = {"distill": DistillConfig, "eval": EvalConfig, "chat": ChatConfig}
TABLE_OF = {"distill": "distill", "plan": "distill", "eval": "eval", "chat": "chat"}  # command -> its table
# str options that may name a local file or folder (else a hub id or a bundled set name).
_MAYBE_PATHS = {"model", "teacher", "prompts", "ood"}
# Options of one run that a file doesn't set: replaying a bake must not replace or resume anything by itself.
_NOT_IN_FILE = {"overwrite", "resume"}
_TYPE_NAMES = {"str": "a string", "Path": "a path (string)", "int": "an integer", "float": "a number",
               "bool": "true or false"}


class ConfigError(InputError):
    """The --config file can't be used: where and why, in one line."""

    def __init__(self, message: str):
        super().__init__(message if message.endswith((".", "?")) else message + ".")


def read_config(path: Path) -> dict[str, Any]:
    """The parsed TOML document at `path`, or a one-line ConfigError (missing, folder, not UTF-8, not TOML)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--config {path} does not exist.")
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give a TOML file such as {path / 'promptbake.toml'}.")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"can't read --config {path} ({err.strerror or err}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path} is not valid TOML: {_toml_reason(err, text)}.") from None


def _toml_reason(err: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message with its position first: 'line 3, column 9: invalid value'."""
    message = str(err)
    where = re.search(r"\(at line (\d+), column (\d+)\)", message)
    what = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message).strip()
    what = what[0].lower() + what[1:] if what else "parse error"
    if where:
        line = text.splitlines()[int(where.group(1)) - 1] if int(where.group(1)) <= len(text.splitlines()) else ""
        if what.startswith("cannot overwrite a value") and "=" in line:  # TOML's word for a key given twice
            what = f"`{line.split('=')[0].strip()}` is given twice; keep one"
        return f"line {where.group(1)}, column {where.group(2)}: {what}"
    return f"at the end of the file: {what}"


def load_settings(path: Path, command: str) -> dict[str, Any]:
    """The option values `command` (distill, plan, eval, chat) takes from the file at `path`.

    Checks the whole file (so a mistake in [eval] fails `distill` too, before a long bake), then
    returns {field name: value} for the top-level keys the command has and its own table's keys,
    typed like the command's fields, with relative paths resolved against the file's folder.
    """
    path = Path(path)
    doc = read_config(path)
    folder = path.absolute().parent
    top, tables = _split(doc, path)
    for name, table in tables.items():
        _check_keys(table, name, path, shared=top)
    table = TABLE_OF[command]
    cls = TABLES[table]
    names = {f.name for f in fields(cls)}
    values = {k: v for k, (_, v) in top.items() if k in names}
    values.update({k: v for k, (_, v) in tables.get(table, {}).items()})
    settings = {k: _typed(cls, k, v, table if k in tables.get(table, {}) else None, path, folder)
                for k, v in values.items()}
    if table in ("eval", "chat") and "baked" not in settings and "out" in tables.get("distill", {}):
        settings["baked"] = _typed(DistillConfig, "out", tables["distill"]["out"][1], "distill", path, folder)
    return settings


def _split(doc: dict, path: Path) -> tuple[dict, dict]:
    """(top-level {name: (key as written, value)}, {table: {name: (key, value)}}), checking names and duplicates."""
    known = set().union(*({f.name for f in fields(c)} for c in TABLES.values()))
    top, tables = {}, {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name == "eval" and not isinstance(value, dict):
            raise ConfigError(f"--config {path}: `eval` at the top level is the [eval] table; to skip distill's "
                              "closing evaluation put `eval = false` under [distill].")
        if isinstance(value, dict):
            if name not in TABLES:
                raise ConfigError(f"--config {path}: unknown table [{key}]{_closest(name, TABLES, '[{}]')}. "
                                  "Tables are [distill], [eval] and [chat].")
            if name in tables:
                raise ConfigError(f"--config {path}: the table [{name}] is given twice ([{key}]); keep one.")
            tables[name] = _names(value, f"[{name}]", path)
            continue
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key `{key}` at the top level"
                              f"{_closest(name, known | set(TABLES))}")
        _add(top, name, key, value, "at the top level", path)
    return top, tables


def _names(table: dict, where: str, path: Path) -> dict:
    named: dict = {}
    for key, value in table.items():
        _add(named, key.replace("-", "_"), key, value, f"in {where}", path)
    return named


def _add(named: dict, name: str, key: str, value, where: str, path: Path) -> None:
    if name in named:
        raise ConfigError(f"--config {path}: `{name}` is given twice {where} (as `{named[name][0]}` and `{key}`); "
                          "keep one.")
    named[name] = (key, value)


def _check_keys(table: dict, name: str, path: Path, *, shared: dict) -> None:
    """Every key of table [name] is an option of that command, and not also set at the top level."""
    cls = TABLES[name]
    options = {f.name for f in fields(cls)} - _NOT_IN_FILE
    for field_name, (key, value) in table.items():
        if field_name not in options:
            elsewhere = [t for t, c in TABLES.items() if t != name and field_name in {f.name for f in fields(c)}]
            hint = (f"; it is an option of {' and '.join(elsewhere)}, so it goes under "
                    f"{' or '.join(f'[{t}]' for t in elsewhere)}") if elsewhere and field_name not in _NOT_IN_FILE \
                else _closest(field_name, options)
            if field_name in _NOT_IN_FILE:
                hint = f"; pass {flag(field_name)} on the command line instead"
            raise ConfigError(f"--config {path}: unknown key `{key}` in [{name}]{hint}")
        if field_name in shared:
            raise ConfigError(f"--config {path}: `{field_name}` is given twice, at the top level and in [{name}]; "
                              "keep one.")
    for field_name, (key, _) in shared.items():
        if field_name in _NOT_IN_FILE:
            raise ConfigError(f"--config {path}: `{key}` can't be set in a config file; pass {flag(field_name)} "
                              "on the command line instead.")


def _closest(name: str, candidates, form: str = "`{}`") -> str:
    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {form.format(match[0])}?" if match else ""


def _typed(cls, name: str, value, table: str | None, path: Path, folder: Path):
    """`value` as field `name` of `cls` takes it, or a ConfigError naming the key and the expected type."""
    f = next(f for f in fields(cls) if f.name == name)
    kind = f.type.removesuffix(" | None")
    where = f"[{table}] " if table else ""
    ok = {"str": isinstance(value, str), "Path": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool)}[kind]
    if not ok:
        raise ConfigError(f"--config {path}: {where}`{name}` must be {_TYPE_NAMES[kind]} "
                          f"(got {_toml_kind(value)} {_show(value)}).")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"--config {path}: {where}`{name}` must be one of {', '.join(choices)} (got {value!r}).")
    if kind == "float":
        return float(value)
    if kind == "Path":
        return _resolve(value, folder)
    if name in _MAYBE_PATHS:
        return _maybe_path(value, folder)
    return value


def _toml_kind(value) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "the string"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, (dict, list)) else ""
    return text if len(text) <= 40 else text[:37] + "..."


def _resolve(value: str, folder: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else folder / p


def _maybe_path(value: str, folder: Path) -> str:
    """A local path resolved against the file's folder; a hub id or bundled name as it is."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = value.startswith(("./", "../", ".\\", "..\\")) or (folder / p).exists()
    return str(folder / p) if local else value


# ---------------------------------------------------------------- the resolved settings of a bake

SETTINGS_FILE = "promptbake.toml"


def resolved_toml(cfg: DistillConfig, *, system_sha256: str, key: str, model_note: str | None = None) -> str:
    """The [distill] table that `--config` reads back to make the same bake (same bake key).

    Paths are absolute. The system prompt appears as its path and SHA-256 only: with --record-prompt
    its text is in promptbake.json, and nowhere else.
    """
    lines = ["# The resolved settings of this bake. Bake it again (it is skipped while up to date):",
             f"#   promptbake distill --config {SETTINGS_FILE} --out OTHER_FOLDER",
             f"# bake key: {key}",
             f"# system prompt: {Path(cfg.prompt).absolute()} (SHA-256 {system_sha256})"]
    if model_note:
        lines.append(f"# model: {model_note}")
    lines += ["", "[distill]"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _NOT_IN_FILE or value is None:  # TOML has no null: an absent key is the default None
            continue
        if f.name in ("prompt", "out", "chat_template", "checks") or (f.name in _MAYBE_PATHS and _is_local(value)):
            value = str(Path(value).expanduser().absolute())
        lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def _is_local(value) -> bool:
    return Path(str(value)).expanduser().exists()


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's

