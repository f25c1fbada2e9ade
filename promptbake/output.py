"""The output folder: checked before any work, built in a hidden sibling, moved into place only when complete.

Nothing the user had is lost: --out is resolved to an absolute path once (`resolve_out`); it may not be,
contain or lie inside an input, nor be or contain the working directory; --overwrite replaces only a
finished promptbake output or an empty folder (`check_output`); and the new output is renamed over the
old one, which is kept until the new one is in place (`publish`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, OutputExistsError, WriteError, describe


# A finished bake's promptbake.json holds these keys; --overwrite replaces only such a folder (or an empty one).
RECORD_KEYS = ("promptbake_version", "base_model", "system_prompt_sha256", "results")
# Top-level names a bake writes besides those the record lists under "files" (older records list none).
_ALWAYS_WRITTEN = ("promptbake.json", "README.md")


def resolve_out(out: Path | str) -> Path:
    """--out as an absolute path, decided once: every later step uses this one.

    Only the parent is resolved through symlinks: `out` itself stays the name the user gave, so a
    symlink at --out is seen (and refused) rather than followed.
    """
    out = Path(out).expanduser()
    if not out.name or out.name in (".", ".."):  # "--out ." or "--out ..": name the folder itself
        out = Path(os.path.realpath(out))
    return Path(os.path.realpath(out.parent)) / out.name


def check_output(out: Path | str, overwrite: bool, *, inputs: dict[str, Path | str | None] | None = None,
                 cwd: Path | str | None = None) -> Path:
    """Fail before any work if a bake may not write `out`; return `out` as an absolute path.

    inputs: the local paths a bake reads, by flag (`{"--model": ..., "--prompt": ...}`); values that are
        None or not on disk (hub ids, bundled prompt sets) are skipped. --out may not be one of them,
        contain one, or lie inside one; nor be or contain `cwd` (default: the current directory).
    overwrite: an existing --out is replaced only when it is a finished promptbake output holding
        nothing a bake didn't write, or an empty folder; anything else is refused, naming what is there.
    """
    out = resolve_out(out)
    real = Path(os.path.realpath(out))
    for flag_name, value in {**(inputs or {}), "the current directory": cwd or os.getcwd()}.items():
        if value is not None and os.path.lexists(Path(value).expanduser()):
            _check_apart(out, real, flag_name, Path(value).expanduser())
    if os.path.islink(out):
        raise InputError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give a folder path that isn't one.")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is a file; choose a folder path.")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"--out {out} already exists; pass --overwrite to replace it, or choose another "
                                    "path.")
        refusal = replace_refusal(out)
        if refusal:
            raise OutputExistsError(f"--out {out} {refusal}; --overwrite replaces only a finished promptbake output "
                                    "or an empty folder: choose another --out, or move those files away.")
        if os.path.ismount(out):
            raise InputError(f"--out {out} is a mount point, which can't be replaced by a rename; "
                             "give a folder inside it.")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        ro = " (a read-only file system)" if _read_only(probe) else ""
        raise InputError(f"can't write to {probe}{ro}: choose an --out folder you can write to.")
    return out


def _check_apart(out: Path, real_out: Path, what: str, path: Path) -> None:
    """Refuse an --out that is `path`, contains it, or (for inputs, not the working directory) lies inside it."""
    real = Path(os.path.realpath(path))
    shown = f"{what} {path}" if what.startswith("--") else f"{what} ({real})"
    if real == real_out:
        raise InputError(f"--out {out} is {shown} itself; choose another --out: promptbake never writes over "
                         "what it reads or where it runs.")
    if real.is_relative_to(real_out):
        raise InputError(f"--out {out} contains {shown}; choose another --out: promptbake never writes over "
                         "what it reads or where it runs.")
    if what.startswith("--") and real_out.is_relative_to(real):
        raise InputError(f"--out {out} lies inside {shown}; choose an --out outside it.")


def replace_refusal(folder: Path) -> str | None:
    """Why --overwrite may not replace `folder` (a phrase naming what is there), or None if it may.

    It may when it is empty, or a finished promptbake output (promptbake.json with RECORD_KEYS) that
    holds no top-level entry besides those its record lists under "files".
    """
    entries = sorted(os.listdir(folder))
    if not entries:
        return None
    record = read_record(folder)
    if record is None:
        return f"is not a promptbake output (no readable promptbake.json) and holds {_some(folder, entries)}"
    if isinstance(record.get("files"), list):
        extra = [e for e in entries if e not in record["files"] and e not in _ALWAYS_WRITTEN]
        if extra:
            return f"is a promptbake output but also holds {_some(folder, extra)}, which promptbake didn't write"
    return None


def read_record(folder: Path) -> dict | None:
    """`folder`/promptbake.json when it is a finished bake's record, else None."""
    path = Path(folder) / "promptbake.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(k in record for k in RECORD_KEYS):
        return None
    return record


def output_files(staging: Path) -> list[str]:
    """The top-level names a finished output holds, for the record's "files" (write it last, into `staging`)."""
    return sorted({*os.listdir(staging), *_ALWAYS_WRITTEN})


def _some(folder: Path, names: list[str], show: int = 3) -> str:
    shown = [f"{n}/" if (folder / n).is_dir() and not (folder / n).is_symlink() else n for n in names[:show]]
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({', '.join(shown)}{more})"


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def make_staging(out: Path) -> Path:
    """An empty hidden folder beside `out` to build the result in: OUT's parent/.OUT.partial-XXXXXXXX."""
    out = _absolute(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        raise WriteError(f"can't create a folder beside --out {out} ({err.strerror or err}).") from None


# The text of OS errors that libraries pass on inside their own exceptions: the tokenizers library
# raises a bare Exception("No space left on device (os error 28)"), safetensors a SafetensorError.
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def is_write_error(err: BaseException) -> bool:
    """An OSError, or a library's wrapping of one (SafetensorError('... I/O error: ...'), tokenizers'
    Exception('... (os error 28)'))."""
    return isinstance(err, OSError) or _wrapped_errno(err) is not None or (
        type(err).__name__ == "SafetensorError" and "I/O error" in str(err))


def _wrapped_errno(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    found = _OS_ERROR_TEXT.search(str(err))
    return int(found.group(1)) if found else None


def write_error(err: BaseException, out: Path, *, kept: str) -> WriteError:
    """The WriteError for a failed final write of `out`, with advice that fits the cause.

    kept: where the trained result survives, e.g. "The trained adapter is kept in OUT.work".
    A full disk asks for space; a read-only file system, a missing permission or a busy folder
    (EBUSY: a mount point, or in use) say so instead: freeing space would not help there.
    """
    code = _wrapped_errno(err)
    reason = os.strerror(code) if code else describe(err)
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space and run the same command again to finish without retraining"
    elif code == errno.EROFS:
        advice = "it is on a read-only file system: make it writable and run the same command again"
    elif code in (errno.EACCES, errno.EPERM):
        advice = "you may not write there: fix the permissions and run the same command again"
    elif code == errno.EBUSY:
        advice = "the folder is busy (a mount point, or in use): free it and run the same command again"
    else:
        advice = "fix that and run the same command again to finish without retraining"
    return WriteError(f"can't write --out {out} ({reason}); it was left as it was. {kept}: {advice}.")


def publish(staging: Path, out: Path, overwrite: bool, *,
            kept: str = "The trained adapter is kept in the work folder") -> None:
    """Move the finished `staging` folder to `out` (both absolute), replacing what `check_output` accepted.

    An earlier `out` is renamed aside to .OUT.old-*, the new one renamed into place, and only then
    is the old one deleted: renames within one folder are atomic, so `out` is at every moment the
    old complete result, or (briefly) absent with the old one beside it, or the new complete one.
    If the second rename fails the old one is put back; if even that fails, the message says where
    it is. A kill between the renames is repaired by the next bake on `out` (`lock.recover`).
    Raises WriteError (with `write_error`'s advice) or OutputExistsError; never deletes what it didn't write.
    """
    staging, out = Path(staging), Path(out)
    if not (staging.is_absolute() and out.is_absolute()):
        raise ValueError("publish takes absolute paths: a relative one moves with the working directory")
    apply_umask(staging)
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(f"--out {out} appeared while baking; nothing was replaced. {kept}: pass "
                                    "--overwrite and run the same command again to write the result from it.")
        refusal = replace_refusal(out) if out.is_dir() and not out.is_symlink() else "is no longer a folder"
        if refusal:
            raise OutputExistsError(f"--out {out} changed while baking: it {refusal}, so nothing was replaced. "
                                    f"{kept}: move those files away and run the same command again.")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.replace(out, old)  # same folder: needs no write permission on `out` itself
        except OSError as err:
            raise write_error(err, out, kept=kept) from None
        try:
            os.replace(staging, out)
        except BaseException as err:
            try:
                os.replace(old, out)  # put the earlier output back
            except OSError as again:
                raise WriteError(
                    f"can't write --out {out} ({describe(err)}), and putting the earlier output back failed too "
                    f"({describe(again)}): it is kept, whole, in {old}; move it back to {out}. {kept}."
                ) from None
            if isinstance(err, Exception):
                raise write_error(err, out, kept=kept) from None
            raise
        shutil.rmtree(old, ignore_errors=True)  # the replaced output; leftovers are cleaned by the next bake
        return
    try:
        os.replace(staging, out)
    except OSError as err:
        raise write_error(err, out, kept=kept) from None


def _absolute(path: Path) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise ValueError(f"expected an absolute path (from resolve_out/check_output), got {path}")
    return path


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain `open`/`mkdir` would have had.

    mkdtemp makes folders 0700 and safetensors writes files 0600; a checkpoint others
    should be able to read (or a CI artifact) wants the user's umask instead.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# How each --method trained the adapter, for the model card.
METHOD_TEXT = {
    "opcd": "on-policy context distillation (`--method opcd`): a LoRA adapter was trained on the token-level "
            "reverse KL between the model without the system prompt (student), on its own samples, and the same "
            "model with it (teacher)",
    "offpolicy": "off-policy context distillation (`--method offpolicy`): the model with the system prompt "
                 "(teacher) sampled answers, and a LoRA adapter was trained on the token-level forward KL from "
                 "the teacher to the model without the prompt (student) on those answers",
    "sft": "supervised fine-tuning on the prompted model's answers (`--method sft`): the model with the system "
           "prompt sampled answers, and a LoRA adapter was trained on the cross-entropy of the model without "
           "the prompt on those answers",
}


def write_model_card(folder: Path, record: dict) -> None:
    r = record["results"]
    method = record.get("method", "opcd")
    before, after = r.get("heldout_kl_before"), r.get("heldout_kl_after")
    figures = ""
    if before is not None and after is not None:
        figures = (
            f"| held-out reverse KL per token (student ‖ prompted teacher) | {before:.4f} | {after:.4f} |\n"
        )
    settings = record["settings"]
    n = settings.get("samples_per_prompt", 1)  # records written before the option have neither key
    batch = f"{settings['batch_size']} prompts" if n == 1 else f"{settings['batch_size'] // n} prompts x {n} samples"
    lr = f"lr {settings['lr']}" if settings.get("lr_schedule", "constant") == "constant" else \
        f"peak lr {settings['lr']} ({settings['lr_schedule']} schedule)"
    using = METHOD_TEXT[method]
    if settings.get("teacher_rollouts"):  # records written before the option lack it
        using += (f"; the teacher sampled {settings['teacher_rollouts']:.0%} of each batch's answers instead "
                  "(`--teacher-rollouts`)")
    stored = ("The system prompt was recorded in `promptbake.json` (--record-prompt)" if "system_prompt" in record
              else "The system prompt itself is not stored here")
    card = f"""---
base_model: {record["base_model"]}
library_name: transformers
tags:
- promptbake
- context-distillation
---

# Baked model

This checkpoint is `{record["base_model"]}` with a system prompt baked into its weights by
[promptbake](https://pypi.org/project/promptbake/) using {using}, then merged into the
full-precision base. Use it with **no system prompt**.

{stored}; its SHA-256 is
`{record["system_prompt_sha256"]}`.

| figure | before | after |
|---|---|---|
{figures}
Training: {settings["steps"]} steps of {batch}, {lr}, LoRA r={settings["lora_rank"]}, quantisation while training:
{record["resolved"]["quant"]}. Settings, versions and figures: `promptbake.json`; per-step
metrics: `metrics.jsonl`; the unmerged adapter: `adapter/`.
"""
    (folder / "README.md").write_text(card, encoding="utf-8")
