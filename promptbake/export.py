"""Export a bake as one GGUF file (llama.cpp, Ollama, LM Studio), with an Ollama Modelfile beside it.

The merged safetensors are renamed to llama.cpp's tensor names, with llama.cpp's
layout changes (q/k rows of Llama-family models regrouped for its rotary layout,
Gemma's norm weights stored as 1 + w), and written with the `gguf` package's
writer and quantisers. The metadata comes from one of two places:

- the bake started from a `.gguf` file that is still there: that file's metadata
  is copied as it is (tokenizer, chat template, rope and norm settings, names)
  and only the weights and the file-type/quantisation fields are new, so the
  result is the same kind of file the user started from;
- otherwise it is written from the checkpoint's config.json and tokenizer, the
  way llama.cpp's convert_hf_to_gguf.py does for these architectures.

Everything is written to hidden temporary names in the target folder and renamed
at the end, so an interrupted export leaves no partial file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .errors import InputError, OutputExistsError, WriteError, describe

from .config import GGUF_OUTTYPES as OUTTYPES


@dataclass(frozen=True)
class _Arch:
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's Llama graph wants each head's rotary halves interleaved
    norm_shift: float  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
    layer: dict[str, str]  # HF name inside `model.layers.N.` -> llama.cpp name inside `blk.N.`


_ATTN = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA = {**_ATTN, "post_attention_layernorm": "ffn_norm"}
_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
ARCHITECTURES = {  # HF model_type -> how llama.cpp stores it
    "llama": _Arch("llama", True, 0.0, _LLAMA),
    "mistral": _Arch("llama", True, 0.0, _LLAMA),  # llama.cpp runs Mistral as llama
    "qwen2": _Arch("qwen2", False, 0.0, _LLAMA),
    "qwen3": _Arch("qwen3", False, 0.0, {**_LLAMA, **_QK_NORM}),
    "gemma3_text": _Arch("gemma3", False, 1.0, {
        **_ATTN, **_QK_NORM, "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}),
}
# Source-file fields that describe the old tensors rather than the model.
_REPLACED_FIELDS = ("general.file_type", "general.quantization_version")

# Byte-level BPE pre-tokenizers llama.cpp knows, by the split the tokenizer.json applies before
# its ByteLevel step (llama.cpp keys them by a hash of sample tokenizations; this reads the rule itself).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


FORMATS = ("gguf",)


def export_gguf(baked_dir: Path, out_file: Path | None = None, outtype: str = "f16", overwrite: bool = False,
                console: Console | None = None, format: str = "gguf", name: str | None = None) -> Path:
    """Write `baked_dir` (a promptbake output folder) as one .gguf, plus an Ollama Modelfile beside it.

    `out_file` defaults to `baked_dir/model-OUTTYPE.gguf`; the Modelfile is `out_file` with the suffix
    `.Modelfile`. `name` (default: the folder's name) becomes general.name unless a source .gguf's
    metadata is carried over. Returns the path of the .gguf.
    """
    console = console or Console(stderr=True)
    if format not in FORMATS:
        raise InputError(f"--format {format} is not supported; the one format is gguf.")
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype} is not one of {', '.join(OUTTYPES)}.")
    baked_dir = Path(baked_dir)
    record = _read_record(baked_dir)
    out_file = Path(out_file) if out_file else baked_dir / f"model-{outtype}.gguf"
    if out_file.suffix != ".gguf":
        raise InputError(f"--out {out_file} must end in .gguf.")
    modelfile = out_file.with_suffix(".Modelfile")
    for path in (out_file, modelfile):
        if path.is_dir():
            raise InputError(f"--out {out_file}: {path} is a folder; choose another file name.")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another --out.")

    from .setup import quiet_libraries

    quiet_libraries()
    config, tok = _load_checkpoint(baked_dir)
    check_exportable(config.model_type)
    arch = ARCHITECTURES[config.model_type]
    source = _source_gguf(record, baked_dir, console)

    import gguf

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_gguf = _temp_name(out_file)
    tmp_modelfile = _temp_name(modelfile)
    try:
        writer = gguf.GGUFWriter(tmp_gguf, arch.gguf)
        if source is not None:
            console.print(f"metadata from {source} (its tokenizer, chat template and settings are kept)",
                          markup=False, highlight=False, soft_wrap=True)
            _copy_metadata(writer, source, arch.gguf, config)
            if "tokenizer.chat_template" not in gguf.GGUFReader(source).fields and tok.chat_template:
                writer.add_chat_template(tok.chat_template)  # the template the bake used (--chat-template)
        else:
            writer.add_name(name or baked_dir.resolve().name)
            _add_hparams(writer, config, arch)
            _add_tokenizer(writer, tok, config)
        writer.add_file_type(_FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n = _add_tensors(writer, baked_dir, config, arch, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        Path(tmp_modelfile).write_text(_modelfile(tok, out_file.name, console), encoding="utf-8")
        _apply_umask(tmp_gguf, tmp_modelfile)
        os.replace(tmp_gguf, out_file)
        os.replace(tmp_modelfile, modelfile)
        _add_to_record_files(baked_dir, record, out_file, modelfile)
    except OSError as err:
        raise WriteError(f"can't write {out_file} ({describe(err)}); nothing was left there.") from None
    finally:
        for tmp in (tmp_gguf, tmp_modelfile):
            Path(tmp).unlink(missing_ok=True)
    size_mb = out_file.stat().st_size / 2**20
    console.print(f"wrote {out_file} ({arch.gguf}, {outtype}, {n} tensors, {size_mb:.1f} MB) and {modelfile}",
                  markup=False, highlight=False, soft_wrap=True)
    if isinstance(record.get("system_prompt_tokens"), int):
        console.print(f"serve it without the system prompt: each request is {record['system_prompt_tokens']} "
                      "prompt tokens shorter", markup=False, highlight=False, soft_wrap=True)
    return out_file


def check_exportable(model_type: str) -> None:
    """Raise InputError for an architecture the GGUF export doesn't know."""
    if model_type not in ARCHITECTURES:
        raise InputError(f"can't export a {model_type} model to GGUF; the architectures it can export are "
                         f"{', '.join(sorted(ARCHITECTURES))}.")


# --- reading the bake ---------------------------------------------------------------------------

def _read_record(baked_dir: Path) -> dict:
    if not baked_dir.exists():
        raise InputError(f"{baked_dir} does not exist; give the --out folder of promptbake distill.")
    if not baked_dir.is_dir():
        raise InputError(f"{baked_dir} is a file; give the --out folder of promptbake distill.")
    path = baked_dir / "promptbake.json"
    if not path.is_file():
        raise InputError(f"{baked_dir} is not a promptbake output (no promptbake.json); give the --out folder "
                         "of promptbake distill.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON; the folder may be damaged: bake again.") from None
    if not isinstance(record, dict):
        raise InputError(f"{path} is not a promptbake record; the folder may be damaged: bake again.")
    return record


def _load_checkpoint(baked_dir: Path):
    """The merged checkpoint's config and tokenizer, after checking its files are there."""
    from transformers import AutoConfig, AutoTokenizer

    if not (baked_dir / "config.json").is_file():
        raise InputError(f"{baked_dir} has no config.json: the checkpoint is missing; bake again.")
    if not list(baked_dir.glob("*.safetensors")):
        raise InputError(f"{baked_dir} has no *.safetensors weights: the checkpoint is missing; bake again.")
    try:
        config = AutoConfig.from_pretrained(baked_dir)
        tok = AutoTokenizer.from_pretrained(baked_dir)
    except Exception as err:  # a damaged config.json or tokenizer file: transformers raises several kinds
        raise InputError(f"{baked_dir}: can't read the checkpoint's config or tokenizer ({describe(err)}); "
                         "bake again.") from None
    return config, tok


def _open_weights(baked_dir: Path) -> dict:
    """{HF tensor name: (file, name)} over all safetensors files, checking each file opens."""
    from safetensors import safe_open

    where = {}
    for file in sorted(baked_dir.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    where[name] = file
        except Exception as err:  # SafetensorError on a truncated or garbled file
            raise InputError(f"{file} is corrupt ({describe(err)}); bake again.") from None
    return where


def _source_gguf(record: dict, baked_dir: Path, console: Console) -> Path | None:
    base = record.get("base_model")
    if not isinstance(base, str) or not base.endswith(".gguf"):
        return None
    path = Path(base).expanduser()
    if not path.is_absolute() and not path.exists():
        path = baked_dir / path
    if not path.is_file():
        console.print(f"note: the bake's source {base} is gone; writing metadata from the checkpoint instead",
                      markup=False, highlight=False, soft_wrap=True)
        return None
    return path


# --- metadata -----------------------------------------------------------------------------------

def _copy_metadata(writer, source: Path, arch: str, config) -> None:
    """Every key-value field of `source` except the file-format and tensor-type ones."""
    import gguf

    reader = gguf.GGUFReader(source)
    src_arch = reader.fields["general.architecture"].contents()
    if src_arch != arch:
        raise InputError(f"the bake's source {source} is a {src_arch} model but the checkpoint is {arch}; "
                         "they don't belong together.")
    for key in (f"{arch}.block_count", f"{arch}.embedding_length"):
        want = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size}[key.split(".")[1]]
        if key in reader.fields and reader.fields[key].contents() != want:
            raise InputError(f"the bake's source {source} has {key} {reader.fields[key].contents()} but the "
                             f"checkpoint has {want}; they don't belong together.")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in _REPLACED_FIELDS:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _add_hparams(writer, config, arch: _Arch) -> None:
    """The architecture's hyper-parameters, as convert_hf_to_gguf.py writes them."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if arch.gguf == "gemma3":  # one set for global layers, one for sliding ones
        local = rope.get("sliding_attention", {})
        rope = rope.get("full_attention", rope)
        writer.add_sliding_window(config.sliding_window)
        if local.get("rope_theta"):
            writer.add_rope_freq_base_swa(local["rope_theta"])
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind != "default":
        raise InputError(f"this checkpoint uses {kind} rope scaling, which the GGUF export doesn't write yet; "
                         "use the safetensors folder (vLLM, transformers) or llama.cpp's convert_hf_to_gguf.py.")
    if arch.gguf == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch.gguf != "llama" or head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer, tok, config) -> None:
    """A byte-level BPE tokenizer ("gpt2" in llama.cpp): tokens, types, merges, special ids, template."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise InputError("the GGUF export can write only byte-level BPE tokenizers (Llama 3, SmolLM, Qwen, GPT-2 "
                         "kind) from a checkpoint folder; bake from a .gguf file to carry its tokenizer over.")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    size = max(config.vocab_size, len(by_id))
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(size):  # ids the tokenizer never uses still need a row: llama.cpp pads them so too
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = tok("a", add_special_tokens=True)["input_ids"]
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    writer.add_add_bos_token(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id])
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    eot = end_of_turn(tok)
    if eot is not None:
        writer.add_eot_token_id(vocab[eot])
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the text split a byte-level tokenizer does before BPE."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise InputError(f"the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) is not one the GGUF export "
                     "knows how to name for llama.cpp; bake from a .gguf file to carry its tokenizer over.")


def end_of_turn(tok) -> str | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <end_of_turn>...)."""
    from .render import end_of_turn_id

    token_id = end_of_turn_id(tok)
    return None if token_id is None else tok.convert_ids_to_tokens(token_id)


# --- tensors ------------------------------------------------------------------------------------

_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def gguf_name(hf: str, arch: _Arch, tied: bool) -> str | None:
    """llama.cpp's name for a checkpoint tensor; None for one it doesn't store."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": None if tied else "output.weight"}
    if hf in fixed:
        return fixed[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and m.group(2) in arch.layer:
        return f"blk.{m.group(1)}.{arch.layer[m.group(2)]}.{m.group(3)}"
    raise InputError(f"the checkpoint has a tensor {hf} that the {arch.gguf} GGUF layout has no place for; "
                     "it is not a plain checkpoint of this architecture.")


def _permute(w, n_head: int):
    """(rows, ...) -> same shape, each head's rows reordered from [half 1, half 2] to interleaved pairs.

    HF rotates the two halves of a head's dimensions together; llama.cpp's Llama graph rotates
    neighbouring pairs, so convert_hf_to_gguf.py regroups the rows of q and k (and transformers'
    GGUF loader undoes it).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensors(writer, baked_dir: Path, config, arch: _Arch, outtype: str) -> int:
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    where = _open_weights(baked_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    missing = sorted(expected - set(where))
    if missing:
        raise InputError(f"{baked_dir}: the checkpoint lacks {', '.join(missing)}; it is incomplete: bake again.")
    names = {hf: gguf_name(hf, arch, tied) for hf in where}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    count = 0
    handles = {}
    try:
        for hf, name in names.items():
            if name is None:
                continue
            file = where[hf]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            w = handles[file].get_tensor(hf).to(torch.float32).numpy()
            if arch.permute_qk and ".attn_q." in name:
                w = _permute(w, heads)
            elif arch.permute_qk and ".attn_k." in name:
                w = _permute(w, kv_heads)
            if arch.norm_shift and name.endswith("norm.weight"):
                w = w + np.float32(arch.norm_shift)
            data, qtype = _convert(np.ascontiguousarray(w), outtype, gguf)
            writer.add_tensor(name, data, raw_dtype=qtype)
            count += 1
    except Exception as err:
        if isinstance(err, (InputError, OSError)):
            raise
        raise InputError(f"{baked_dir}: can't read the checkpoint's weights ({describe(err)}); bake again.") from None
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return count


def _convert(w, outtype: str, gguf):
    """One tensor in the output type. 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them; a
    matrix whose rows don't split into Q8_0's 32-value blocks falls back to F16."""
    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or outtype == "f32":
        return w, Q.F32
    if outtype == "q8_0" and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(w, Q.BF16), Q.BF16
    return w.astype("float16"), Q.F16


# --- the Modelfile ------------------------------------------------------------------------------

def _modelfile(tok, gguf_name: str, console: Console) -> str:
    from .modelfile import TemplateTranslationError, modelfile_text, translate

    template = None
    # llama.cpp and Ollama add BOS themselves when the tokenizer does (Gemma's); a template that
    # writes it too would give two, so the Go template leaves out a leading BOS in that case.
    bos = tok.bos_token if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id] else None
    if tok.chat_template:
        def render(messages, add_generation_prompt):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            return text.removeprefix(bos) if bos else text

        try:
            template = translate(render)
        except TemplateTranslationError as err:
            console.print(f"note: the Modelfile has no TEMPLATE ({err}); Ollama will use the chat template "
                          "stored in the GGUF", markup=False, highlight=False, soft_wrap=True)
    stops = [t for t in dict.fromkeys([end_of_turn(tok), tok.eos_token]) if t]
    return modelfile_text(gguf_name, template, stops)


def _add_to_record_files(baked_dir: Path, record: dict, *written: Path) -> None:
    """List files written into the bake's own folder in promptbake.json's "files", the names a later
    `distill --overwrite` may replace; without them there it would refuse to touch the folder."""
    files = record.get("files")
    if not isinstance(files, list) or any(p.resolve().parent != baked_dir.resolve() for p in written):
        return
    record["files"] = sorted({*files, *(p.name for p in written)})
    tmp = _temp_name(baked_dir / "promptbake.json")
    Path(tmp).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _apply_umask(tmp)
    os.replace(tmp, baked_dir / "promptbake.json")


def _temp_name(path: Path) -> str:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    return name


def _apply_umask(*paths: str) -> None:
    """mkstemp makes files 0600; give them the mode a plain open() would have had."""
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        os.chmod(p, 0o666 & ~umask)
