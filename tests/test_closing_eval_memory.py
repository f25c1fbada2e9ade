"""The closing evaluation loads fresh copies of the model: the training model must be gone by then."""

from __future__ import annotations

import gc
import weakref

import promptbake.finish
import promptbake.setup
from ci_bakes import SETTINGS, invoke


def test_training_model_is_freed_before_the_closing_evaluation(tiny_model, prompt_files, tmp_path, monkeypatch):
    system, prompts = prompt_files
    trained, alive = [], {}
    original_add_lora, original_eval = promptbake.setup.add_lora, promptbake.finish.evaluate_bake

    def add_lora(base, cfg):
        model = original_add_lora(base, cfg)
        trained.append(weakref.ref(model))
        return model

    def evaluate_bake(*args, **kwargs):
        gc.collect()
        alive["student"] = trained[0]() is not None
        return original_eval(*args, **kwargs)

    monkeypatch.setattr(promptbake.setup, "add_lora", add_lora)
    monkeypatch.setattr(promptbake.finish, "evaluate_bake", evaluate_bake)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    result = invoke("distill", "--model", tiny_model, "--prompt", system, "--prompts", prompts,
                    "--out", tmp_path / "baked", *args)
    assert result.exit_code == 0, result.output
    assert len(trained) == 1 and alive == {"student": False}
