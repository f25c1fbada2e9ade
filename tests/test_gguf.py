"""Loading a .gguf model: a tiny Llama written as GGUF in-process, then loaded and baked by promptbake.

The file is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama with a byte-level BPE
("gpt2") tokenizer: F32 tensors under llama.cpp names, q/k rows permuted for llama.cpp's rotary
layout (transformers permutes them back on load), and the vocabulary, merges, special ids and chat
template as tokenizer.* metadata. Everything the loaders see comes from that one file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to write and read .gguf files")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from promptbake.cli import app  # noqa: E402
from promptbake.models import load_config, load_model, load_tokenizer, resolve_model  # noqa: E402

from tiny import build_model, build_tokenizer  # noqa: E402

SYSTEM = "You are a pirate. Answer like one."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}]


def _permute(weight, n_head: int, n_head_kv: int):
    """llama.cpp's LlamaModel.permute: interleave each head's two rotary halves."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path: Path, tok, model) -> Path:
    """Write `model` and `tok` to `path` as an F32 llama GGUF."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "ids must be dense for a GGUF token list"
    # As convert_hf_to_gguf.py does: special added tokens (<|im_start|> too, which is no named special
    # token) are CONTROL, so the loader keeps them whole instead of splitting them into bytes.
    control = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[layer + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[layer + "self_attn.q_proj.weight"], heads, heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[layer + "self_attn.k_proj.weight"], heads, kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[layer + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[layer + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[layer + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[layer + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:  # as llama.cpp does: a tied model has no output.weight
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def original():
    """The tiny tokenizer and model the GGUF is written from."""
    tok = build_tokenizer()
    model = build_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return tok, model.eval()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, original) -> Path:
    tok, model = original
    # The file sits in a folder of its own, as a downloaded .gguf usually does: no config.json beside it.
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tok, model)


@pytest.fixture(scope="module")
def loaded(gguf_path):
    src = resolve_model(str(gguf_path))
    tok = load_tokenizer(src)
    config = load_config(src)
    model = load_model(src, quant="none", device=torch.device("cpu"), dtype=torch.float32)
    return src, tok, config, model


def test_resolve_model_points_from_pretrained_at_the_file(gguf_path, loaded, original):
    src, _, config, model = loaded
    assert src.path == str(gguf_path.parent)
    assert src.gguf_file == "tiny.gguf"
    assert src.kwargs["gguf_file"] == "tiny.gguf"
    assert config.model_type == "llama"
    ref = original[1].config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, name) == getattr(ref, name), name
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_tokenizer_from_gguf_encodes_like_the_original(loaded, original):
    ref, tok = original[0], loaded[1]
    assert tok.chat_template == ref.chat_template
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.get_vocab() == ref.get_vocab()
    chat = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n" + SYSTEM)
    for text in ["Why is the sky blue?", "  leading spaces,\ttabs\n\nand newlines ",
                 "Bonjour, ¿qué tal? Guten Tag! 0123456789 😀", "<|im_start|>user\nhi<|im_end|>", chat]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == \
        ref.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)


def test_model_from_gguf_gives_the_original_logits(loaded, original):
    ref, model = original[1], loaded[3]
    ids = torch.randint(0, ref.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row, as promptbake batches them
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_distill_from_gguf_writes_a_plain_checkpoint(tmp_path, gguf_path, original):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "sys.txt").write_text(SYSTEM + "\n", encoding="utf-8")
    (tmp_path / "prompts.txt").write_text(
        "Why is the sky blue?\nWrite a short poem about the sea.\nHow do I sort a list in Python?\n"
        "Explain photosynthesis.\nSay hello in French.\nWhat is the wind?\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "distill", "--model", str(gguf_path), "--prompt", str(tmp_path / "sys.txt"), "--out", str(out),
        "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--batch-size", "2",
        "--max-new-tokens", "8", "--lora-rank", "4", "--holdout", "0.34",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))

    # The output is an ordinary checkpoint: no gguf_file, no promptbake, plain from_pretrained. Nothing in
    # it may say GGUF: a `quantization_config` naming the GGUF quantizer would reload the model as
    # quantized, refusing save_pretrained and training.
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = original[1]
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert getattr(merged, "hf_quantizer", None) is None
    merged.save_pretrained(tmp_path / "resaved")
    assert merged.config.vocab_size == ref.config.vocab_size
    assert set(merged.state_dict()) == set(ref.state_dict())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == original[0].chat_template
    chat = tok.apply_chat_template(MESSAGES[1:], add_generation_prompt=True, return_dict=False)
    assert chat == original[0].apply_chat_template(MESSAGES[1:], add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([chat])
    with torch.no_grad():
        logits = merged(ids).logits
    assert torch.isfinite(logits).all()
    # LoRA B starts at zero; two AdamW steps must have moved the merged weights off the base.
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert changed
