"""Finding and loading models and tokenizers: hub ids, local folders and .gguf files.

`resolve_model` is cheap (no torch) so bad paths and unreachable hub ids fail in
about a second; the `load_*` functions import transformers when called. A .gguf file
is converted once into promptbake's cache (see gguf_cache.py) and read from there.
"""

from __future__ import annotations

import hashlib
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from .errors import InputError, ModelLoadError, TokenizerMismatchError, first_line

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, in the form `from_pretrained` wants."""

    spec: str  # what the user typed
    path: str  # folder, hub id, or the folder holding the .gguf file
    gguf_file: str | None = None
    local_files_only: bool = False
    allow_pickle: bool = False  # --allow-pickle: accept pytorch_model.bin weights

    @property
    def kwargs(self) -> dict:
        kw: dict = {"local_files_only": self.local_files_only}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def resolve_model(spec: str, what: str = "model", *, allow_pickle: bool = False) -> ModelSource:
    """Turn --model/--teacher into a ModelSource, failing fast on missing paths, unreachable hubs and
    folders whose weights exist only as pickle files (unpickling can run code) unless allow_pickle."""
    path = Path(spec).expanduser()
    looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local:
        if not path.exists():
            raise InputError(f"{what} path {spec} does not exist.")
        if path.is_file():
            if path.suffix != ".gguf":
                raise InputError(f"{what} {spec} is a file but not a .gguf file; give a model folder or a .gguf file.")
            return ModelSource(spec, str(path.parent), gguf_file=path.name)
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds {ggufs[0]}: pass that file instead." if ggufs else ""
            raise InputError(f"{what} folder {spec} has no config.json, so it isn't a Hugging Face model.{hint}")
        pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles and not any(path.glob("*.safetensors")) and not allow_pickle:
            raise InputError(
                f"{what} folder {spec} holds its weights only as pickle ({pickles[0]}), and loading pickle can run "
                "code: convert it to safetensors, or pass --allow-pickle if you trust where it came from."
            )
        return ModelSource(spec, str(path), allow_pickle=allow_pickle)
    if not HUB_ID.match(spec):
        raise InputError(f"{what} {spec!r} is neither an existing path nor a hub id like org/name.")
    return ModelSource(spec, spec, local_files_only=not hub_reachable_or_cached(spec, what), allow_pickle=allow_pickle)


def hub_reachable_or_cached(repo_id: str, what: str, repo_type: str = "model") -> bool:
    """True if the hub can be used; False if only the local cache can. Raises if neither.

    repo_type "model" looks for the repo's config.json in the cache, "dataset" for its README.md
    (the dataset card `datasets` downloads first).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    cached = isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str)
    error, instead = ((ModelLoadError, "a local folder or .gguf file") if repo_type == "model"
                      else (InputError, "a local file or save_to_disk folder"))
    if constants.HF_HUB_OFFLINE:
        if cached:
            return False
        raise error(
            f"{what} {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
            f"pass {instead} instead."
        )
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        if cached:
            return False  # use the cache rather than letting the library retry for ~47 s
        raise error(
            f"can't reach {host} to download {what} {repo_id}, and it is not in the local cache; "
            f"pass {instead} instead."
        ) from None


def loadable(src: ModelSource) -> ModelSource:
    """`src` in the form the loaders read: a .gguf file becomes its converted folder in promptbake's
    cache (converted on first use); `spec` still names the user's file, for messages."""
    if not src.gguf_file:
        return src
    from .gguf_cache import cached_folder

    folder = cached_folder(Path(src.path) / src.gguf_file)
    return replace(src, path=str(folder), gguf_file=None, local_files_only=True)


def load_tokenizer(src: ModelSource, *, chat_template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = loadable(src)
    folder = Path(src.path)
    if not src.gguf_file and folder.is_dir() and not any(_is_tokenizer_file(p.name) for p in folder.iterdir()):
        raise ModelLoadError(f"{src.spec} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): copy "
                             "those of the model it came from into that folder.")
    try:
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs)
    except Exception as err:  # the tokenizers library raises a bare Exception for a broken tokenizer.json
        _reraise_unless_a_file_problem(err)
        raise ModelLoadError(f"can't load the tokenizer of {src.spec}: {_one_line(err)} Check its tokenizer "
                             "files (tokenizer.json, tokenizer_config.json), or download or copy them again.") from None
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token_id is None:
        # Padding is masked everywhere; any real id will do, EOS is the usual choice.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_config(src: ModelSource, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    src = loadable(src)
    try:
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs)
    except Exception as err:
        _reraise_unless_a_file_problem(err)
        raise ModelLoadError(f"can't read the config of {src.spec}: {first_line(err)}") from None


def context_length(config) -> int | None:
    """The model's maximum number of positions, when the config says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pick_device_and_dtype():
    """CUDA with bf16 when there is a GPU, else CPU with fp32."""
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def resolve_quant(quant: str, device) -> str:
    """'auto' -> 4bit on CUDA, none on CPU; check bitsandbytes for the others."""
    if quant == "auto":
        quant = "4bit" if device.type == "cuda" else "none"
    if quant in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # ImportError, or a broken native library
            raise InputError(
                f"--quant {quant} needs bitsandbytes, which can't be loaded here ({first_line(err)}); "
                "install it (pip install bitsandbytes) or use --quant none."
            ) from None
    return quant


def load_model(src: ModelSource, *, quant: str, device, dtype, trust_remote_code: bool = False):
    """Load a causal LM for training: frozen base weights, optionally quantised with bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = loadable(src)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, **src.kwargs}
    if not src.allow_pickle:
        kwargs["use_safetensors"] = True  # a hub repo with only pytorch_model.bin fails here instead of unpickling
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except Exception as err:
        raise _weights_error(err, src, use_safetensors=kwargs.get("use_safetensors", False)) from None
    if quant == "none":
        model.to(device)
    elif quant == "4bit" and device.type == "cpu":
        _keep_4bit_trainable_on_cpu(model)
    model.requires_grad_(False)
    model.eval()  # no dropout in the base; LoRA dropout is set on the adapter
    torch.set_grad_enabled(True)
    return model


def _keep_4bit_trainable_on_cpu(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a Linear4bit's first eval-mode forward without gradients (a
    rollout, a teacher pass) repacks its weight for a fast inference kernel, for good; every
    later forward, training ones included, then goes through that kernel, which has no
    backward, so the LoRA gradients come out wrong (measured: ~80% relative error) with only
    a warning. Turning the repacking off keeps the dequantise-and-matmul path, whose gradient is exact.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_tokenizers_match(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int) -> int:
    """Raise TokenizerMismatchError unless both tokenizers map text to the same ids.

    Returns the number of logit columns both models share (their config vocab sizes
    may differ by padding rows, e.g. 151936 vs 152064 for Qwen sizes).
    """
    if len(student_tok) != len(teacher_tok):
        raise TokenizerMismatchError(
            f"teacher and student tokenizers differ: vocab size {len(teacher_tok)} vs {len(student_tok)}; "
            "the teacher must share the student's tokenizer."
        )
    for name in ("bos_token", "eos_token", "unk_token"):
        s, t = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if s != t:
            raise TokenizerMismatchError(f"teacher and student tokenizers differ: {name} is {t!r} vs {s!r}.")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
        diff = next(k for k in sorted(set(s_vocab) | set(t_vocab)) if s_vocab.get(k) != t_vocab.get(k))
        raise TokenizerMismatchError(
            f"teacher and student tokenizers differ: token {diff!r} has id {t_vocab.get(diff)} vs {s_vocab.get(diff)}."
        )
    shared = min(student_vocab, teacher_vocab)
    if shared < len(student_tok):
        raise TokenizerMismatchError(
            f"a model's output layer ({shared} rows) is smaller than the tokenizer ({len(student_tok)} tokens)."
        )
    return shared


def _weights_error(err: Exception, src: ModelSource, *, use_safetensors: bool) -> Exception:
    """The ModelLoadError for a failed weights load; errors that aren't about the files pass through."""
    import pickle

    _reraise_unless_a_file_problem(err)
    if type(err).__name__ == "SafetensorError" or "deserializing header" in str(err):
        return ModelLoadError(
            f"model {src.spec}: a safetensors weights file is damaged or incomplete ({first_line(err)}); "
            "download or copy the model again."
        )
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return ModelLoadError(
            f"model {src.spec}: torch refused to load its pickle weights because they hold more than tensors, "
            "and unpickling them could run code. Don't use these files; convert a copy you trust to safetensors."
        )
    if use_safetensors and "safetensors" in str(err):
        return ModelLoadError(f"model {src.spec} has no safetensors weights, and loading pickle weights can run "
                              "code: pass --allow-pickle if you trust where it came from.")
    return ModelLoadError(f"can't load model {src.spec}: {first_line(err)}")


def _reraise_unless_a_file_problem(err: Exception) -> None:
    """Out of memory and interrupts are not a broken model: let them through to their own handling."""
    from .errors import PromptbakeError, is_out_of_memory

    if is_out_of_memory(err) or isinstance(err, PromptbakeError):
        raise err


def _one_line(err: BaseException, limit: int = 400) -> str:
    """All of a library's message on one line (some put the useful part on the second), ending in a stop."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text if text.endswith((".", "…")) else text + "."


# --- The model's identity, for refusing a resume whose model changed at the same path. ---

_TOKENIZER_NAMES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")
_TEMPLATE_NAMES = ("chat_template.jinja", "chat_template.json")
_CONFIG_NAMES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in _TOKENIZER_NAMES or name.endswith(".model")


def model_fingerprint(src: ModelSource) -> dict[str, str]:
    """A cheap identity of a model's files, one SHA-256 per part, so a change can be named.

    {"config": ..., "tokenizer": ..., "chat_template": ..., "weights": ...}, or {"gguf": ...} for a .gguf file

    config, tokenizer and chat_template hash the contents of those small files (config.json and
    generation_config.json; tokenizer.json, tokenizer_config.json without its chat template, vocab,
    merges, sentencepiece models; chat_template.jinja/.json, the template inside tokenizer_config.json
    and additional_chat_templates/). Weights files (*.safetensors, *.bin, *.gguf, ...) are far too big
    to hash at every start: their name, size and modification time stand for them, so rewriting a
    file in place is seen, while copying the model without keeping times (`cp` without `-p`) also
    counts as a change. A .gguf model holds everything in its one file: its one part is that
    file's name, size and time. A hub id uses its cached snapshot's files and, for weights (not downloaded
    yet at the first start), the snapshot's commit; call it after the config and tokenizer are loaded.
    """
    from .data import sha256_text  # data imports this module at its top

    folder = _snapshot_folder(src)
    if src.gguf_file:
        return {"gguf": sha256_text(_stat_line(folder / src.gguf_file))}
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    names = {p.name: p for p in files}

    def digest(parts: list[tuple[str, bytes]]) -> str:
        h = hashlib.sha256()
        for name, data in parts:
            h.update(f"{name}\0{len(data)}\0".encode("utf-8") + data)
        return h.hexdigest()

    tokenizer_config, template = names.get("tokenizer_config.json"), b""
    tok_parts = []
    for p in files:
        if not _is_tokenizer_file(p.name):
            continue
        data = p.read_bytes()
        if p == tokenizer_config:  # its chat template is a part of its own
            data, template = _split_template(data)
        tok_parts.append((p.name, data))
    template_parts = [("tokenizer_config.json:chat_template", template)]
    template_parts += [(n, names[n].read_bytes()) for n in _TEMPLATE_NAMES if n in names]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        template_parts += [(f"{extra.name}/{p.name}", p.read_bytes()) for p in sorted(extra.iterdir()) if p.is_file()]
    if src.path != str(folder):  # a hub id: the snapshot's commit names its weights
        weights = sha256_text(folder.name)
    else:
        weights = sha256_text("\n".join(_stat_line(p) for p in files if p.name.endswith(_WEIGHT_SUFFIXES)))
    return {
        "config": digest([(n, names[n].read_bytes()) for n in _CONFIG_NAMES if n in names]),
        "tokenizer": digest(tok_parts),
        "chat_template": digest(template_parts),
        "weights": weights,
    }


def _snapshot_folder(src: ModelSource) -> Path:
    """The folder holding the model's files: the local one, or a hub id's cached snapshot."""
    folder = Path(src.path)
    if folder.is_dir():
        return folder
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(src.path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else folder


def _split_template(tokenizer_config: bytes) -> tuple[bytes, bytes]:
    """(tokenizer_config.json without "chat_template", that template as bytes)."""
    import json

    try:
        data = json.loads(tokenizer_config)
    except ValueError:
        return tokenizer_config, b""
    if not isinstance(data, dict):
        return tokenizer_config, b""
    template = data.pop("chat_template", None)
    rest = json.dumps(data, sort_keys=True).encode("utf-8")
    return rest, json.dumps(template, sort_keys=True).encode("utf-8") if template is not None else b""


def _stat_line(path: Path) -> str:
    st = path.stat()
    return f"{path.name} {st.st_size} {st.st_mtime_ns}"


