"""Stop ids: the tokenizer's EOS, the generation config's, and the end-of-turn token the chat template writes.

Each template kind is tried on the tiny byte-level tokenizer, given the special tokens that template
uses, with EOS set to something else where the real family does so (a Qwen-style ChatML tokenizer's
EOS is <|endoftext|>, not <|im_end|>), so the end of turn can only come from the template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GenerationConfig

from promptbake.render import stop_token_ids

from tiny import CHATML, NO_SYSTEM, build_model, build_tokenizer

# The file shipped as promptbake/prompts/templates/gemma3.jinja (read from the checkout under test).
GEMMA_FILE = Path(__file__).resolve().parents[1] / "prompts" / "templates" / "gemma3.jinja"
GEMMA = GEMMA_FILE.read_text(encoding="utf-8")
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Llama 2 / Mistral style: an assistant turn ends with " " + EOS, no token of its own.
EOS_ENDED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
# A base-model style template: turns are separated by plain text, no special token at all.
PLAIN = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}" \
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"


def _tokenizer(template: str, specials: list[str], eos: str, bos: str | None = None):
    tok = build_tokenizer(template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    return tok


def _id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def test_chatml_ends_a_turn_with_im_end():
    tok = _tokenizer(CHATML, [], eos="<|endoftext|>")
    assert stop_token_ids(tok) == [_id(tok, "<|endoftext|>"), _id(tok, "<|im_end|>")]


def test_gemma_ends_a_turn_with_end_of_turn():
    tok = _tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"], eos="<eos>", bos="<bos>")
    assert stop_token_ids(tok) == [_id(tok, "<eos>"), _id(tok, "<end_of_turn>")]


def test_llama3_ends_a_turn_with_eot_id():
    tok = _tokenizer(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     eos="<|endoftext|>", bos="<|begin_of_text|>")
    assert stop_token_ids(tok) == [_id(tok, "<|endoftext|>"), _id(tok, "<|eot_id|>")]


def test_a_template_that_ends_turns_with_eos_adds_nothing():
    tok = _tokenizer(EOS_ENDED, ["<s>", "</s>"], eos="</s>", bos="<s>")
    assert stop_token_ids(tok) == [_id(tok, "</s>")]


def test_a_template_with_no_end_token_adds_nothing():
    tok = _tokenizer(PLAIN, [], eos="<|endoftext|>")
    assert stop_token_ids(tok) == [_id(tok, "<|endoftext|>")]


def test_a_template_without_a_system_role_is_probed_the_same_way():
    tok = _tokenizer(NO_SYSTEM, [], eos="<|endoftext|>")
    assert stop_token_ids(tok) == [_id(tok, "<|endoftext|>"), _id(tok, "<|im_end|>")]


def test_the_generation_config_adds_its_eos_ids_once_each():
    tok = _tokenizer(CHATML, ["<|eot_id|>"], eos="<|endoftext|>")
    eot, im_end, eos = _id(tok, "<|eot_id|>"), _id(tok, "<|im_end|>"), _id(tok, "<|endoftext|>")
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[eos, eot])) == [eos, eot, im_end]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=im_end)) == [eos, im_end]
    assert stop_token_ids(tok, GenerationConfig()) == [eos, im_end]


def test_no_chat_template_leaves_only_eos():
    tok = build_tokenizer(None)
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_save_merged_writes_the_stop_ids_into_generation_config(tmp_path):
    from peft import LoraConfig, get_peft_model

    from promptbake.merge import save_merged
    from promptbake.models import ModelSource

    tok = _tokenizer(CHATML, [], eos="<|endoftext|>")
    base = build_model(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    stops = stop_token_ids(tok, base.generation_config)
    assert len(stops) == 2
    out = tmp_path / "out"
    save_merged(peft_model, tmp_path / "adapter", out, src=ModelSource("x", "x"), quantised=False,
                dtype=torch.float32, trust_remote_code=False, stop_ids=stops)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
    assert GenerationConfig.from_pretrained(out).eos_token_id == stops



def test_rollouts_stop_at_the_templates_end_of_turn_and_keep_it(tmp_path):
    """A Qwen-style tokenizer (EOS <|endoftext|>, ChatML turns ending in <|im_end|>): the bake's rollouts stop at
    <|im_end|>, which only the template says ends a turn, and the cut response keeps it.

    The model is made to emit <|im_end|> at a known step by swapping two rows of its output layer: where greedy
    decoding picked token t, it now picks <|im_end|>, and every earlier step is unchanged.
    """
    import tiny
    from conftest import PIRATE
    from promptbake.render import Renderer
    from promptbake.sampling import sample_with_generate

    tok = _tokenizer(CHATML, [], eos="<|endoftext|>")
    im_end, eos = _id(tok, "<|im_end|>"), tok.eos_token_id
    model = build_model(len(tok), eos_token_id=eos, pad_token_id=tok.pad_token_id, bos_token_id=None).eval()
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = [Renderer(tok, PIRATE).student_ids(messages)]
    free = sample_with_generate(model, ids, generator=torch.Generator().manual_seed(0), max_new_tokens=8,
                                temperature=0.0, top_p=1.0, eos_ids=[-1], pad_id=tok.pad_token_id)[0]
    j = next(j for j in range(1, len(free)) if free[j] not in free[:j] + [im_end, eos] and im_end not in free[:j])
    with torch.no_grad():
        head = model.lm_head.weight
        head[[free[j], im_end]] = head[[im_end, free[j]]].clone()
    folder = tmp_path / "qwen-style"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    pair = tiny.load_pair(folder, PIRATE, lora_init_std=0.0, temperature=0.0, max_new_tokens=8)
    assert pair.sampling.eos_ids == [eos, im_end]
    (response,) = pair.rollout([messages], torch.Generator().manual_seed(0)).responses
    assert response == free[:j] + [im_end]
