"""Options checked against the model's config before any weights load: --lora-targets and --kl-topk."""

from __future__ import annotations

import pytest

from promptbake.errors import InputError
from promptbake.models import load_config, resolve_model
from promptbake.preflight import check_kl_topk, check_lora_targets, layer_names

ADAPTABLE = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture(scope="module")
def layers(tiny_model):
    return layer_names(load_config(resolve_model(str(tiny_model))))


@pytest.mark.parametrize("targets", ["all-linear", "q_proj", "q_proj, v_proj", "self_attn.q_proj", "lm_head"])
def test_names_of_adaptable_layers_pass(layers, targets):
    check_lora_targets(targets, layers)


@pytest.mark.parametrize("targets", ["no_such_module", "q_proj,no_such_module"])
def test_an_unknown_name_is_refused_even_beside_known_ones(layers, targets):
    # peft itself refuses only when no name matches: "q_proj,no_such_module" would train q_proj alone, silently.
    with pytest.raises(InputError) as err:
        check_lora_targets(targets, layers)
    assert str(err.value) == (f"--lora-targets {targets}: the model has no layer named 'no_such_module'; its layers "
                              f"LoRA can adapt are named {ADAPTABLE} (or use all-linear).")


def test_a_name_of_a_container_is_refused(layers):
    with pytest.raises(InputError, match="'mlp' names a LlamaMLP, which LoRA can't adapt"):
        check_lora_targets("mlp", layers)


def test_an_empty_list_is_refused(layers):
    with pytest.raises(InputError, match="names no layer"):
        check_lora_targets(" , ", layers)


def test_layer_names_read_no_weights(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder)  # no weights file at all
    names = layer_names(load_config(resolve_model(str(folder))))
    assert names == layer_names(load_config(resolve_model(str(tiny_model))))


def test_kl_topk_above_the_vocabulary_is_refused():
    check_kl_topk(400, 400)
    with pytest.raises(InputError, match=r"--kl-topk 401 is larger than the vocabulary \(400 tokens\)"):
        check_kl_topk(401, 400)
