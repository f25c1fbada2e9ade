"""Prompt sets: read user prompts from a bundled set, a file, a `datasets` folder or a hub dataset.

A prompt is a list of chat messages ending with a user turn, e.g.
`[{"role": "user", "content": "Why is the sky blue?"}]`. The student sees those
messages as they are; the teacher sees the system prompt in front of them.

`load_prompt_set` reads a source, drops empty rows and exact duplicates, shuffles
with the seed and keeps the first `max_prompts`. It returns a `PromptSet`: the
prompts plus a count of what was dropped and why, so nothing is dropped silently.
`datasets` reads the formats it knows (json, csv, parquet, saved folders, the hub)
and is imported only when one of those is asked for: it takes about a second.

Files are read whole, so they must be regular files (never a pipe or a device) of bounded size:
a prompt set file at most 256 MiB (`PROMPT_FILE_LIMIT`), a system prompt file at most 1 MiB
(`SYSTEM_PROMPT_LIMIT`); `read_text_file` does this for any other text input too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import tempfile
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import InputError
from .models import HUB_ID, hub_reachable_or_cached

Messages = list[dict[str, str]]

BUNDLED_SETS = {"default": "default.txt", "eval": "eval.txt", "ood": "ood.txt"}
BUNDLED_USES = {
    "default": "training prompts: questions, how-to, writing, code, maths, advice, a few other languages",
    "eval": "evaluation prompts of the same kinds, sharing none with default",
    "ood": "out-of-distribution tasks (formatting, arithmetic, extraction...) to measure drift",
}
# File types by suffix: the .txt and .jsonl readers are ours (their errors name the line);
# the others go through the `datasets` builder of that name.
DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_TYPES = (".txt", ".jsonl", *DATASETS_BUILDERS)
# Why prompts leave a set, in the order the filters run; the values are what reports say.
DROP_REASONS = {
    "empty": "empty",
    "duplicate": "duplicated",
    "beyond_max_prompts": "beyond --max-prompts",
    "too_long": "too long for the context",
}


@dataclass
class PromptSet:
    """The prompts a source yields, and how many of its rows were dropped for each reason."""

    source: str
    prompts: list[Messages]
    rows: int  # prompts (lines, rows) read before any filter
    dropped: dict[str, int] = field(default_factory=dict)  # DROP_REASONS key -> count, only reasons that dropped

    def __len__(self) -> int:
        return len(self.prompts)

    def keep(self, predicate: Callable[[Messages], bool], reason: str) -> PromptSet:
        """A copy holding only the prompts `predicate` accepts; the others are counted under `reason`."""
        kept = [m for m in self.prompts if predicate(m)]
        dropped = dict(self.dropped)
        if len(kept) < len(self.prompts):
            dropped[reason] = dropped.get(reason, 0) + len(self.prompts) - len(kept)
        return replace(self, prompts=kept, dropped=dropped)

    def drop_summary(self) -> str:
        """'1 empty, 3 duplicated' or 'none'."""
        parts = [f"{n} {DROP_REASONS[reason]}" for reason, n in self.dropped.items()]
        return ", ".join(parts) or "none"

    def describe(self) -> str:
        """One line for reports: how many prompts, from how many rows, and what was dropped."""
        n = len(self.prompts)
        return f"{n} prompt{'s' * (n != 1)} from {self.source} ({self.rows} read; dropped: {self.drop_summary()})"


def load_prompt_set(
    source: str,
    *,
    prompt_field: str = "prompt",
    split: str = "train",
    max_prompts: int = 0,
    seed: int | None = 0,
) -> PromptSet:
    """Read `source`, drop empty prompts and exact duplicates, shuffle with `seed`, keep `max_prompts`.

    source: a bundled set name (default, eval, ood); a .txt, .jsonl, .json, .csv or .parquet
        file; a folder written by `datasets`' save_to_disk; or a hub dataset id (org/name).
    prompt_field: the column holding a prompt string or a chat `messages` list. When it is
        the default "prompt" and absent, a `messages` column is used instead.
    split: the split of a saved DatasetDict folder or a hub dataset (ignored for files).
    max_prompts: keep at most this many after shuffling (0 keeps all).
    seed: shuffle order; None keeps the source's order.
    Raises InputError naming the line or row of malformed input, and when nothing is left.
    """
    if max_prompts < 0:
        raise InputError(f"--max-prompts must be 0 (all) or a positive number (got {max_prompts}).")
    rows = _read_source(source, prompt_field, split)
    if not rows:
        raise InputError(f"prompt set {source} holds no prompts.")
    ps = PromptSet(source, rows, len(rows)).keep(lambda m: m is not None, "empty")

    seen: set[tuple] = set()

    def first_time(m: Messages) -> bool:  # exact duplicates, up to whitespace
        key = tuple((turn["role"], " ".join(turn["content"].split())) for turn in m)
        new = key not in seen
        seen.add(key)
        return new

    ps = ps.keep(first_time, "duplicate")
    if not ps.prompts:
        raise InputError(f"prompt set {source} yields no prompts: {ps.rows} read, dropped: {ps.drop_summary()}.")
    if seed is not None:
        order = list(ps.prompts)
        random.Random(seed).shuffle(order)  # before --max-prompts, so a cap takes a random sample
        ps = replace(ps, prompts=order)
    if max_prompts and len(ps) > max_prompts:
        ps = replace(ps, prompts=ps.prompts[:max_prompts],
                     dropped={**ps.dropped, "beyond_max_prompts": len(ps) - max_prompts})
    return ps


def load_prompts(source: str, **options) -> list[Messages]:
    """Every prompt of a set in the source's order (no shuffle); see `load_prompt_set` for the options."""
    return load_prompt_set(source, seed=None, **options).prompts


def bundled_dir() -> Path:
    """The folder holding the prompt sets and example system prompts shipped with the package."""
    return Path(str(resources.files("promptbake.prompts")))


@dataclass
class BundledSet:
    name: str
    path: Path
    size: int
    use: str


@dataclass
class ExamplePrompt:
    name: str
    path: Path
    words: int
    checks: int  # [[check]] tables in NAME.checks.toml beside it (0 if there is none)


def bundled_sets() -> list[BundledSet]:
    return [BundledSet(name, bundled_dir() / file, len(load_prompts(name)), BUNDLED_USES[name])
            for name, file in BUNDLED_SETS.items()]


def example_system_prompts() -> list[ExamplePrompt]:
    """The example system prompts in prompts/system, with their word and check counts."""
    out = []
    for path in sorted((bundled_dir() / "system").glob("*.txt")):
        checks = path.with_name(f"{path.stem}.checks.toml")
        n_checks = len(re.findall(r"(?m)^\s*\[\[check\]\]", checks.read_text(encoding="utf-8"))) if checks.exists() else 0
        out.append(ExamplePrompt(path.stem, path, len(read_system_prompt(path).split()), n_checks))
    return out


# --- Reading sources: each returns one entry per line/row, None for an empty prompt. ---


def _read_source(source: str, prompt_field: str, split: str) -> list[Messages | None]:
    if source in BUNDLED_SETS:
        return _read_txt(bundled_dir() / BUNDLED_SETS[source])
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_table(_load_saved(path, split), prompt_field, f"dataset {path}")
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _read_txt(path)
        if suffix == ".jsonl":
            return _read_jsonl(path, prompt_field)
        if suffix in DATASETS_BUILDERS:
            check_regular_file(path, "prompt set", PROMPT_FILE_LIMIT)
            return _from_table(_load_file(path, DATASETS_BUILDERS[suffix]), prompt_field, str(path))
        raise InputError(f"prompt set {path}: unsupported file type {suffix or '(none)'}; "
                         f"use {', '.join(FILE_TYPES)}, a save_to_disk folder or a hub dataset id.")
    looks_local = source.startswith((".", "/", "~")) or source.count("/") != 1 or path.suffix.lower() in FILE_TYPES
    if looks_local or not HUB_ID.match(source):
        names = ", ".join(BUNDLED_SETS)
        raise InputError(f"prompt set {source!r} not found: give a file path, a bundled set ({names}) "
                         "or a hub dataset id like org/name.")
    return _from_table(_load_hub(source, split), prompt_field, f"dataset {source}")


def _read_txt(path: Path) -> list[Messages | None]:
    """One prompt per line; blank lines and # comments are not prompts."""
    lines = read_text_file(path, "prompt set", PROMPT_FILE_LIMIT).splitlines()
    return [_user(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _read_jsonl(path: Path, prompt_field: str) -> list[Messages | None]:
    # Our own reader rather than `datasets`: errors can name the line, and `datasets` would
    # silently fill a field missing from one row with null.
    rows = []
    for n, line in enumerate(read_text_file(path, "prompt set", PROMPT_FILE_LIMIT).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with a {prompt_field!r} field.")
        rows.append(_to_messages(row[_pick_field(list(row), prompt_field, where)], where))
    return rows


def _from_table(table, prompt_field: str, where: str) -> list[Messages | None]:
    """Prompts from one column of a `datasets.Dataset`."""
    column = _pick_field(table.column_names, prompt_field, where)
    return [_to_messages(value, f"{where}, row {i}") for i, value in enumerate(table[column], start=1)]


def _pick_field(fields: list[str], prompt_field: str, where: str) -> str:
    if prompt_field in fields:
        return prompt_field
    if prompt_field == "prompt" and "messages" in fields:
        return "messages"
    listed = ", ".join(fields) or "none"
    raise InputError(f"{where}: no field {prompt_field!r} (fields present: {listed}); "
                     "choose one with --prompt-field NAME.")


def _to_messages(value: object, where: str) -> Messages | None:
    """A prompt string or a chat `messages` list -> Messages; None for an empty prompt."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return _user(value)
    if isinstance(value, list):
        return check_messages(value, where)
    raise InputError(f"{where}: the prompt is a {type(value).__name__}, not text or a list of chat messages.")


def _user(text: str) -> Messages | None:
    return [{"role": "user", "content": text.strip()}] if text.strip() else None


def check_messages(messages: object, where: str) -> Messages:
    """Validate a chat-format prefix: user/assistant turns, ending with a user turn, no system turn."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: each message needs a 'role' and a string 'content'.")
        if m.get("role") == "system":
            raise InputError(f"{where}: has a system message, which would conflict with the baked prompt; remove it.")
        if m.get("role") not in ("user", "assistant"):
            raise InputError(f"{where}: unknown role {m.get('role')!r} (expected user or assistant).")
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be a user turn for the model to answer.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _datasets():
    """Import `datasets` on first use, with its progress bars and log chatter off."""
    import datasets

    datasets.disable_progress_bars()
    # Its failures reach us as exceptions, which become one `error:` line; its own logging of the
    # same failure (e.g. "Failed to read schema from ...") would print it twice, the first raw.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _load_file(path: Path, builder: str):
    """A local json/csv/parquet file as an in-memory Dataset; its Arrow cache goes in a temporary folder."""
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="promptbake-data-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True)
        except Exception as err:  # parse errors arrive as pyarrow, json and datasets exceptions alike
            raise InputError(f"can't read {path} as {builder}: {_cause(err)}") from None


def _load_saved(path: Path, split: str):
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    datasets = _datasets()
    try:
        table = datasets.load_from_disk(str(path), keep_in_memory=True)
    except FileNotFoundError:
        raise InputError(f"prompt set {path} is a folder but not a dataset saved with save_to_disk; "
                         f"give such a folder or a file ({', '.join(FILE_TYPES)}).") from None
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise InputError(f"dataset {path} has no split {split!r}; its splits are {', '.join(table)}. "
                             "Choose one with --split NAME.")
        table = table[split]
    return table


def _load_hub(repo_id: str, split: str):
    hub_reachable_or_cached(repo_id, "dataset", repo_type="dataset")  # fail fast offline
    datasets = _datasets()
    try:
        return datasets.load_dataset(repo_id, split=split)
    except ValueError as err:  # an unknown split; the message lists the ones there are
        raise InputError(f"dataset {repo_id}: {_cause(err)} Choose one with --split NAME.") from None
    except Exception as err:  # not found, gated, no data files, connection lost mid-download
        raise InputError(f"can't load dataset {repo_id}: {_cause(err)}") from None


def _cause(err: BaseException) -> str:
    """The first line of the innermost error: `datasets` wraps parse errors in its own."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def read_system_prompt(path: Path) -> str:
    """The system prompt file's text, never truncated; InputError if missing, empty or not UTF-8."""
    text = read_text_file(Path(path), "system prompt file", SYSTEM_PROMPT_LIMIT)
    if not text.strip():
        raise InputError(f"system prompt file {path} is empty.")
    return text.strip()


# Files are read whole into memory, so each kind has a size limit; far above any real use, it turns
# a wrong path (a disk image, /dev/zero) into an error instead of a MemoryError or a machine that swaps.
SYSTEM_PROMPT_LIMIT = 1 << 20  # 1 MiB: ~250k tokens, beyond any model's context
PROMPT_FILE_LIMIT = 256 << 20  # 256 MiB of prompts; a bigger set can be a save_to_disk folder or a hub dataset
TEXT_FILE_LIMIT = 1 << 20  # a chat template or a checks file


def read_text_file(path: Path, what: str, limit: int = TEXT_FILE_LIMIT) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; InputError naming the file otherwise.

    Named pipes, devices and sockets are refused without reading from them: opening a FIFO waits
    for a writer and /dev/zero never ends. The file is opened non-blocking and checked with fstat,
    so nothing can swap it for a pipe between the check and the read.
    """
    data = read_bytes_file(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (bad byte at offset {err.start}).") from None


def read_bytes_file(path: Path, what: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them (see `read_text_file`)."""
    fd = _open_regular(Path(path), what, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)  # one more than allowed: a file that grew since fstat is caught too
    if len(data) > limit:
        raise _too_big(Path(path), what, len(data), limit)
    return data


def check_regular_file(path: Path, what: str, limit: int) -> None:
    """Refuse what `read_text_file` would refuse, for files another library reads (json, csv, parquet)."""
    os.close(_open_regular(Path(path), what, limit))


def _open_regular(path: Path, what: str, limit: int) -> int:
    if not os.path.lexists(path):
        raise InputError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without waiting
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist (a symbolic link to nothing).") from None
    except OSError as err:
        raise InputError(f"can't open {what} {path} ({err.strerror or err}).") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise InputError(f"{what} {path} is {kind}; give a regular file (promptbake reads it whole, so it "
                         "can't be a pipe or a device).")
    size = os.fstat(fd).st_size
    if size > limit:
        os.close(fd)
        raise _too_big(path, what, size, limit)
    return fd


def _too_big(path: Path, what: str, size: int, limit: int) -> InputError:
    hint = (" Give a shorter file, or a save_to_disk folder or hub dataset for a bigger prompt set."
            if limit == PROMPT_FILE_LIMIT else " Check that the path names the right file.")
    return InputError(f"{what} {path} is over {_mib(size)}, above the {_mib(limit)} limit for it.{hint}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def split_holdout(prompts: list[Messages], fraction: float, seed: int, minimum: int = 4) -> tuple[list, list]:
    """Shuffle with `seed` and keep `fraction` (at least `minimum`) apart: (train, heldout)."""
    n_held = max(minimum, round(fraction * len(prompts)))
    if len(prompts) - n_held < 1:
        raise InputError(
            f"prompt set has {len(prompts)} prompts: too few to keep {n_held} apart for evaluation "
            f"and still train; give at least {n_held + 1}."
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = [prompts[i] for i in order[:n_held]]
    train = [prompts[i] for i in order[n_held:]]
    return train, held


def sha256_text(text: str) -> str:
    """The SHA-256 of a text's UTF-8 bytes: how promptbake names a system prompt without storing it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def spread(prompts: list, n: int) -> list:
    """At most n items, evenly spaced through the list (sets are grouped by kind, so not just the first n)."""
    if len(prompts) <= n:
        return list(prompts)
    return [prompts[i * len(prompts) // n] for i in range(n)]
