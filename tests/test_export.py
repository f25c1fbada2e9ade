"""`promptbake export`: a tiny bake of each architecture written as GGUF and loaded back through
transformers' GGUF loader, which undoes llama.cpp's layout (q/k row order, Gemma's 1 + w norms) on
its own; the logits must match the safetensors checkpoint. Plus metadata carried over from a source
.gguf, the Ollama Modelfile's template against the Jinja chat template, and every bad input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package writes and reads .gguf files")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import tiny  # noqa: E402
from promptbake.cli import app  # noqa: E402
from promptbake.errors import InputError, OutputExistsError  # noqa: E402
from promptbake.export import ARCHITECTURES, export_gguf  # noqa: E402
from promptbake.modelfile import CHECKS, TemplateTranslationError, render_go, translate  # noqa: E402

runner = CliRunner()
PROMPTS = ["Why is the sky blue?", "Arr matey, ahoy!", "How do I sort a list in Python?", "Bonjour 0123"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)


def _model(kind: str, vocab: int, tok):
    """A tiny model of `kind`, briefly trained on the tiny corpus."""
    import transformers as tf

    special = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    configs = {
        "llama": lambda: tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False,
                                        **SMALL, **special),
        "llama-tied": lambda: tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True,
                                             **SMALL, **special),
        "qwen2": lambda: tf.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False,
                                        **SMALL, **special),  # q/k/v carry biases
        # transformers' GGUF loader doesn't read qwen3.attention.key_length (it keeps Qwen3Config's default
        # head_dim of 128, which real Qwen3 models use): give the tiny one that head_dim too.
        "qwen3": lambda: tf.Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=128,
                                        tie_word_embeddings=False, **SMALL, **special),
        "mistral": lambda: tf.MistralConfig(vocab_size=vocab, num_key_value_heads=2, sliding_window=None,
                                            tie_word_embeddings=False, **SMALL, **special),
        # transformers' GGUF loader takes query_pre_attn_scalar and the sliding layers' rope base from
        # Gemma3TextConfig's defaults (256, 10000): keep those so the reloaded model is the same model.
        "gemma3": lambda: tf.Gemma3TextConfig(vocab_size=vocab, num_key_value_heads=1, head_dim=16,
                                              sliding_window=64, **SMALL, **special),
    }
    config = configs[kind]()
    torch.manual_seed(0)
    cls = tf.Gemma3ForCausalLM if kind == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping or shift shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    _fit(model, tok)
    return model.eval()


def _fit(model, tok, steps: int = 40):
    """A few steps on the tiny corpus, so the model's next-token choices are clear-cut as a real model's
    are: a random model's near-ties would let q8_0's rounding flip greedy tokens by chance."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                     tokenize=False) for p, c in zip(PROMPTS * 2, tiny.CORPUS)]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def save_bake(folder: Path, kind: str = "llama", base_model: str = "tiny-model") -> Path:
    """A promptbake output as distill writes it: merged safetensors, tokenizer, promptbake.json."""
    tok = tiny.build_tokenizer()
    model = _model(kind, len(tok), tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    record = {"promptbake_version": "0.1.0", "base_model": base_model, "teacher_model": base_model,
              "system_prompt_sha256": "0" * 64, "system_prompt_tokens": 17, "architecture": type(model).__name__,
              "vocab_size": len(tok)}
    (folder / "promptbake.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bakes")
    return {kind: save_bake(root / f"{kind}-bake", kind) for kind in
            ("llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma3")}


def _export(bake: Path, tmp_path: Path, outtype: str, **kw) -> Path:
    # The .gguf goes in a folder of its own: transformers' GGUF tokenizer loader picks up a
    # tokenizer_config.json lying beside the file, which would hide what the file itself holds.
    return export_gguf(bake, tmp_path / "gguf" / f"model-{outtype}.gguf", outtype=outtype, **kw)


def _load(folder: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def _ids(tok):
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                   return_dict=False) for p in PROMPTS]
    width = max(map(len, ids))
    return torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids]), \
        torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])


# Max |logit difference| allowed, relative to the largest |logit|: f16 keeps 11 significant bits
# (relative rounding 2^-11 ~ 5e-4 per weight), bf16 8 bits (2^-8 ~ 4e-3); errors add up over 2 layers.
RELATIVE_TOL = {"f16": 5e-3, "bf16": 3e-2}


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_export_reloads_with_the_checkpoint_logits(bakes, tmp_path, kind, outtype):
    from transformers import AutoTokenizer

    bake = bakes[kind]
    path = _export(bake, tmp_path, outtype)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == ARCHITECTURES[_load(bake).config.model_type].gguf
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (kind not in ("llama-tied", "gemma3"))  # tied: no separate head
    if kind == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    ref_tok = AutoTokenizer.from_pretrained(bake)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text

    ref, got = _load(bake), _load(path.parent, path.name)
    ids, mask = _ids(ref_tok)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        have = got(input_ids=ids, attention_mask=mask).logits
    if outtype == "f32":
        torch.testing.assert_close(have, want, atol=1e-4, rtol=0)
    elif outtype in RELATIVE_TOL:
        scale = want.abs().max().item()
        assert (have - want).abs().max().item() <= RELATIVE_TOL[outtype] * scale
        assert (have - want).abs().max().item() > 0  # the weights really were rounded
    else:  # q8_0: the same greedy continuations
        with torch.no_grad():
            a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            b = got.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        assert a.tolist() == b.tolist()


def test_tensor_names_agree_with_gguf_py(bakes, tmp_path):
    """The hand-written mapping against gguf-py's own table of HF -> llama.cpp names."""
    from promptbake.export import gguf_name

    for kind, bake in bakes.items():
        model = _load(bake)
        arch_name = ARCHITECTURES[model.config.model_type].gguf
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
        table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
        tied = model.config.tie_word_embeddings
        for hf in model.state_dict():
            if hf == "lm_head.weight" and tied:
                continue
            base, suffix = hf.rsplit(".", 1)
            assert gguf_name(hf, ARCHITECTURES[model.config.model_type], tied) == \
                f"{table.get_name(base)}.{suffix}", (kind, hf)


def test_llama_q_and_k_rows_are_in_llama_cpp_order(bakes, tmp_path):
    """Read the raw tensor: row 2j and 2j+1 of each head are HF's rows j and j + head_dim/2."""
    from safetensors.torch import load_file

    path = _export(bakes["llama"], tmp_path, "f32")
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    hf = load_file(bakes["llama"] / "model.safetensors")
    q = torch.from_numpy(raw["blk.0.attn_q.weight"].data.copy()).reshape(64, 64)
    want = hf["model.layers.0.self_attn.q_proj.weight"].reshape(4, 2, 8, 64).transpose(1, 2).reshape(64, 64)
    assert torch.equal(q, want)
    assert not torch.equal(q, hf["model.layers.0.self_attn.q_proj.weight"])
    v = torch.from_numpy(raw["blk.0.attn_v.weight"].data.copy()).reshape(32, 64)
    assert torch.equal(v, hf["model.layers.0.self_attn.v_proj.weight"])  # v is not rotated: unchanged


def test_metadata_is_carried_over_from_a_source_gguf(bakes, tmp_path):
    """A bake whose source was a .gguf: the export keeps that file's fields and replaces only the
    weights and the file type. The source here is another export, given a name and a key of its own
    that the checkpoint could not have produced."""
    src = _export(bakes["llama"], tmp_path / "src", "f32")
    reader = gguf.GGUFReader(src)
    marked = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(marked, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.name"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_name("The Original Model")
    writer.add_string("general.source.url", "https://example.invalid/original")
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data.copy(), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    record = json.loads((bake / "promptbake.json").read_text())
    record["base_model"] = str(marked)
    (bake / "promptbake.json").write_text(json.dumps(record))
    out = _export(bake, tmp_path / "out", "q8_0")

    before, after = gguf.GGUFReader(marked).fields, gguf.GGUFReader(out).fields
    assert after["general.name"].contents() == "The Original Model"
    assert after["general.source.url"].contents() == "https://example.invalid/original"
    assert after["tokenizer.ggml.tokens"].contents() == before["tokenizer.ggml.tokens"].contents()
    assert after["tokenizer.ggml.merges"].contents() == before["tokenizer.ggml.merges"].contents()
    assert after["tokenizer.chat_template"].contents() == before["tokenizer.chat_template"].contents()
    assert after["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    skip = {"general.file_type", "GGUF.tensor_count", "GGUF.kv_count"}
    for key in before:
        if key not in skip:
            assert after[key].contents() == before[key].contents(), key
    assert set(after) - set(before) == set()
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}


def test_a_gone_source_gguf_falls_back_to_the_checkpoint(bakes, tmp_path):
    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    record = json.loads((bake / "promptbake.json").read_text())
    record["base_model"] = str(tmp_path / "deleted.gguf")
    (bake / "promptbake.json").write_text(json.dumps(record))
    r = runner.invoke(app, ["export", str(bake), "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    assert f"note: the bake's source {tmp_path / 'deleted.gguf'} is gone" in r.stderr.replace("\n", "")
    assert (bake / "model-f32.gguf").is_file()


# --- the Modelfile --------------------------------------------------------------------------------

SMOLLM_TEMPLATE = (  # SmolLM2-Instruct's: a default system line when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # Gemma 3's, as promptbake passes it: no system role, system text opens the first user turn
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + "
    "(first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _jinja(template: str, bos: str = "<bos>"):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(template)
    return lambda messages, add_generation_prompt: compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos)


MORE = CHECKS + [
    [{"role": "user", "content": "Ünïcödé 😀 and \"quotes\" and \\ backslashes {{ braces }}"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.mark.parametrize("template", [tiny.CHATML, SMOLLM_TEMPLATE, GEMMA_TEMPLATE, LLAMA3_TEMPLATE, tiny.NO_SYSTEM],
                         ids=["chatml", "smollm2", "gemma3", "llama3", "no-system"])
def test_modelfile_template_renders_like_the_chat_template(template):
    """Rendered text of the Go template (by promptbake.modelfile.render_go, a renderer of the Go
    text/template subset the Modelfile uses) equals the Jinja template's, conversation by conversation."""
    render = _jinja(template)
    go = translate(render)
    for messages in MORE:
        try:
            want = render(messages, True)
        except Exception:
            assert messages[0]["role"] == "system"  # only the no-system template refuses, and only these
            continue
        assert render_go(go, messages) == want, messages
    if template == SMOLLM_TEMPLATE:  # the default system line the bake trained with is kept
        assert "You are a helpful AI assistant named SmolLM" in render_go(go, MORE[0])
    if template == GEMMA_TEMPLATE:
        assert render_go(go, CHECKS[2]) == "<bos><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n" \
                                           "<start_of_turn>model\n"


def test_render_go_follows_go_semantics():
    """Cases whose output follows from Go's text/template rules (trim markers, range, if/else, eq/and, index)."""
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_go("a  {{- \"b\" -}}  c", []) == "abc"
    assert render_go("{{ range $i, $_ := .Messages }}[{{ $i }}:{{ .Role }}]{{ end }}", msgs) == "[0:system][1:user]"
    assert render_go('{{ if eq .Messages 1 }}x{{ else if and 1 0 }}y{{ else }}z{{ end }}', msgs) == "z"
    assert render_go("{{ (index $.Messages 1).Content }}", msgs) == "U"
    assert render_go("{{ len (slice $.Messages 1) }}", msgs) == "1"
    with pytest.raises(ValueError):
        render_go("{{ template \"x\" }}", msgs)


def test_a_template_that_renders_content_twice_is_refused():
    twice = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateTranslationError):
        translate(_jinja(twice))


def test_modelfile_beside_the_gguf(bakes, tmp_path):
    path = _export(bakes["llama"], tmp_path, "f16")
    text = path.with_suffix(".Modelfile").read_text()
    lines = text.splitlines()
    assert f"FROM ./{path.name}" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert not any(line.startswith("SYSTEM") for line in lines)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tok = tiny.build_tokenizer()
    for messages in CHECKS:
        assert render_go(template, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    eot = gguf.GGUFReader(path).fields["tokenizer.ggml.eot_token_id"].contents()
    assert eot == tok.convert_tokens_to_ids("<|im_end|>")


# --- the CLI and bad input ------------------------------------------------------------------------

def assert_clean_error(result, message, folder: Path, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in result.stderr.replace("\n", " "), result.stderr
    if folder.exists():
        assert not list(folder.glob("*.gguf")) and not list(folder.glob(".*partial*"))


def test_cli_export_default_path(bakes, tmp_path):
    bake = tmp_path / "bake"
    shutil.copytree(bakes["qwen2"], bake)
    record = json.loads((bake / "promptbake.json").read_text())
    (bake / "promptbake.json").write_text(json.dumps({**record, "files": ["config.json", "model.safetensors"]}))
    r = runner.invoke(app, ["export", str(bake), "--format", "gguf", "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    assert f"wrote {bake / 'model-q8_0.gguf'} (qwen2, q8_0" in r.stderr.replace("\n", "")
    assert "each request is 17 prompt tokens shorter" in r.stderr.replace("\n", " ")
    assert (bake / "model-q8_0.gguf").is_file() and (bake / "model-q8_0.Modelfile").is_file()
    assert not list(bake.glob(".*partial*"))
    assert json.loads((bake / "promptbake.json").read_text())["files"] == [
        "config.json", "model-q8_0.Modelfile", "model-q8_0.gguf", "model.safetensors"]


def test_existing_output_needs_overwrite(bakes, tmp_path):
    out = tmp_path / "o" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"keep me")
    r = runner.invoke(app, ["export", str(bakes["llama"]), "--out", str(out)])
    assert r.exit_code == 2 and f"error: {out} already exists; pass --overwrite" in r.stderr.replace("\n", "")
    assert out.read_bytes() == b"keep me" and not list(out.parent.glob(".*partial*"))
    with pytest.raises(OutputExistsError):
        export_gguf(bakes["llama"], out)
    r = runner.invoke(app, ["export", str(bakes["llama"]), "--out", str(out), "--overwrite", "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def test_not_a_promptbake_output(tmp_path):
    plain = tiny.save_tiny(tmp_path / "plain")  # a checkpoint, but no promptbake.json
    r = runner.invoke(app, ["export", str(plain)])
    assert_clean_error(r, f"error: {plain} is not a promptbake output (no promptbake.json)", plain)
    r = runner.invoke(app, ["export", str(tmp_path / "nope")])
    assert_clean_error(r, f"error: {tmp_path / 'nope'} does not exist", tmp_path)
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["export", str(tmp_path / "file")])
    assert_clean_error(r, f"error: {tmp_path / 'file'} is a file", tmp_path)


def test_bad_record(bakes, tmp_path):
    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    (bake / "promptbake.json").write_text("{not json")
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, f"error: {bake / 'promptbake.json'} is not valid JSON", bake)


def test_missing_checkpoint(bakes, tmp_path):
    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    (bake / "model.safetensors").unlink()
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, f"error: {bake} has no *.safetensors weights: the checkpoint is missing", bake)
    (bake / "config.json").unlink()
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, f"error: {bake} has no config.json", bake)


def test_corrupt_checkpoint(bakes, tmp_path):
    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    weights = bake / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, f"error: {weights} is corrupt", bake)
    weights.write_bytes(b"\x00" * 64)
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, f"error: {weights} is corrupt", bake)


def test_a_checkpoint_missing_a_tensor(bakes, tmp_path):
    from safetensors.torch import load_file, save_file

    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    sd = load_file(bake / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, bake / "model.safetensors", metadata={"format": "pt"})
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, "the checkpoint lacks model.norm.weight; it is incomplete", bake)


def test_unknown_outtype_and_format(bakes, tmp_path):
    r = runner.invoke(app, ["export", str(bakes["llama"]), "--outtype", "q4_k", "--out", str(tmp_path / "m.gguf")])
    assert_clean_error(r, "error: --outtype q4_k is not one of f32, f16, bf16, q8_0.", tmp_path)
    r = runner.invoke(app, ["export", str(bakes["llama"]), "--format", "onnx", "--out", str(tmp_path / "m.gguf")])
    assert_clean_error(r, "error: --format onnx is not supported; the one format is gguf.", tmp_path)
    r = runner.invoke(app, ["export", str(bakes["llama"]), "--out", str(tmp_path / "m.bin")])
    assert_clean_error(r, f"error: --out {tmp_path / 'm.bin'} must end in .gguf.", tmp_path)


def test_an_architecture_it_cannot_export(tmp_path):
    import transformers as tf

    tok = tiny.build_tokenizer()
    bake = tmp_path / "bake"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(bake)
    tok.save_pretrained(bake)
    (bake / "promptbake.json").write_text(json.dumps({"base_model": "gpt2"}))
    r = runner.invoke(app, ["export", str(bake)])
    assert_clean_error(r, "error: can't export a gpt2 model to GGUF; the architectures it can export are "
                          "gemma3_text, llama, mistral, qwen2, qwen3.", bake)


def test_library_error_types(bakes, tmp_path):
    with pytest.raises(InputError, match="--outtype"):
        export_gguf(bakes["llama"], tmp_path / "m.gguf", outtype="int4")


# --- distill --export gguf ------------------------------------------------------------------------

def test_distill_export_writes_the_gguf_inside_the_output(tiny_dir, prompt_files, tmp_path):
    system, prompts = prompt_files
    out = tmp_path / "baked"
    r = runner.invoke(app, ["distill", "--model", str(tiny_dir), "--prompt", str(system), "--prompts", str(prompts),
                            "--out", str(out), "--steps", "1", "--batch-size", "2", "--max-new-tokens", "6",
                            "--no-eval", "--export", "gguf", "--export-outtype", "f32"])
    assert r.exit_code == 0, r.output
    path = out / "model-f32.gguf"
    assert path.is_file() and (out / "model-f32.Modelfile").is_file()
    assert not list(tmp_path.glob(".*partial*"))
    fields = gguf.GGUFReader(path).fields
    assert fields["general.name"].contents() == "baked"  # the --out name, not the hidden staging folder's
    record = json.loads((out / "promptbake.json").read_text())
    assert record["settings"]["export"] == "gguf"
    # listed as the bake's own files, so a later `distill --overwrite` may replace them
    assert {"model-f32.gguf", "model-f32.Modelfile", "model.safetensors"} <= set(record["files"])
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(path, solo / path.name)
    ref, got = _load(out), _load(solo, path.name)
    ids = torch.tensor([tiny.build_tokenizer()("Why is the sky blue?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_distill_export_refuses_an_unknown_architecture_before_training(prompt_files, tmp_path):
    import transformers as tf

    tok = tiny.build_tokenizer()
    model_dir = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                     eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    system, prompts = prompt_files
    out = tmp_path / "baked"
    r = runner.invoke(app, ["distill", "--model", str(model_dir), "--prompt", str(system), "--prompts", str(prompts),
                            "--out", str(out), "--steps", "1", "--export", "gguf"])
    assert_clean_error(r, "error: can't export a gpt2 model to GGUF; the architectures it can export are", tmp_path)
    assert "loading" not in r.stderr  # refused before the weights load
    assert not out.exists()


def test_modelfile_leaves_bos_to_the_runtime_when_the_tokenizer_adds_it(bakes, tmp_path):
    """llama.cpp and Ollama add BOS when the tokenizer does; a TEMPLATE writing it too would give two."""
    from tokenizers import processors

    bake = tmp_path / "bake"
    shutil.copytree(bakes["llama"], bake)
    tok = tiny.build_tokenizer("{{ bos_token }}" + tiny.CHATML)
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))])
    tok.save_pretrained(bake)
    path = _export(bake, tmp_path, "f32")
    template = path.with_suffix(".Modelfile").read_text().split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents() is True
    for messages in CHECKS:
        jinja = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert jinja.startswith("<|endoftext|><|im_start|>")
        assert render_go(template, messages) == jinja.removeprefix("<|endoftext|>")
