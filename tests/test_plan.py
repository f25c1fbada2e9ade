"""`promptbake plan`: distill's checks before the weights, the figures it shows, and no weight load."""

from __future__ import annotations

import json

import pytest

from ci_bakes import ci_bake, invoke  # noqa: F401  (ci_bake: a session fixture)


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read model weights fails the test: promptbake's loader, transformers' and safetensors'."""
    import safetensors
    import safetensors.torch
    import transformers

    import promptbake.models
    import promptbake.setup

    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(promptbake.models, "load_model", refuse)
    monkeypatch.setattr(promptbake.setup, "load_model", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse, raising=False)


def test_plan_reads_no_weights_and_counts_what_the_bake_used(ci_bake, no_weights):
    result = invoke("plan", "--config", ci_bake.config, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    record = ci_bake.record
    assert plan["ok"] is True and plan["exit_code"] == 0 and plan["error"] is None
    assert plan["prompts"]["train"] == record["prompts"]["train"]
    assert plan["prompts"]["heldout"] == record["prompts"]["heldout"]
    assert plan["prompts"]["read"] == record["prompts"]["read"]
    assert plan["prompts"]["dropped"] == record["prompts"]["dropped"]
    assert plan["system_prompt_tokens"] == record["system_prompt_tokens"]
    assert plan["prefix_reuse"] == record["resolved"]["prefix_reuse"] is True
    assert (plan["device"], plan["dtype"], plan["quant"]) == \
        (record["resolved"]["device"], record["resolved"]["dtype"], record["resolved"]["quant"])
    assert plan["bake_key"] == record["bake"]["key"]
    assert plan["out_status"] == "up_to_date" and plan["will_bake"] is False
    settings = record["settings"]
    assert plan["response_tokens_per_step"] == settings["batch_size"] * settings["max_new_tokens"]
    # Every token of a bake step is at most batch x max_new_tokens.
    rows = [json.loads(line) for line in (ci_bake.out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response_tokens"] <= plan["response_tokens_per_step"] for r in rows)


def test_plan_figures(ci_bake, no_weights):
    plan = json.loads(invoke("plan", "--config", ci_bake.config, "--json", "--force").stdout)
    assert plan["will_bake"] is True and plan["notes"] == ["--force: distill bakes again and replaces --out"]
    memory = plan["memory_mb"]
    assert set(memory) == {"weights", "rollout_copy", "lora_and_optimizer", "rollout_kv_cache", "teacher_pass",
                           "activations", "loss_chunk", "total", "largest_phase", "free"}
    # the peak: what stays resident plus the largest of the phases, which never overlap
    resident = memory["weights"] + memory["rollout_copy"] + memory["lora_and_optimizer"]
    phases = {"rollout": memory["rollout_kv_cache"], "teacher pass": memory["teacher_pass"],
              "student backward": memory["activations"] + memory["loss_chunk"]}
    assert memory["largest_phase"] == max(phases, key=phases.get)
    assert memory["total"] == pytest.approx(resident + max(phases.values()), abs=0.3)
    assert memory["rollout_copy"] > 0 and memory["free"] > 0  # CPU, unquantised: the fast sampler's merged copy
    wall = plan["wall_seconds"]
    phases = wall["per_step_phases"]
    assert set(phases) == {"rollout", "teacher", "student", "optim"} and all(v >= 0 for v in phases.values())
    assert wall["per_step"] == pytest.approx(sum(phases.values()), abs=0.02)
    assert wall["training"] == pytest.approx(ci_bake.record["settings"]["steps"] * wall["per_step"], abs=0.2)
    assert wall["total"] == pytest.approx(wall["training"] + wall["heldout_kl"] + wall["closing_eval"], abs=0.2)
    assert wall["closing_eval"] >= 0 and wall["heldout_kl"] >= 0  # a tiny model: hundredths of a second
    # The tiny model has 2 layers: both copies are timed as they are, and scaled to nothing further.
    assert "copies of the model with 1 and 2 of its 2 layers and random weights" in wall["how"]


def test_plan_parameter_counts_match_the_bake(ci_bake, tiny_model):
    """The meta-device copy counts what the real model and the trained adapter hold."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plan = json.loads(invoke("plan", "--config", ci_bake.config, "--json").stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert plan["parameters"] == sum(p.numel() for p in model.parameters())
    adapter = load_file(ci_bake.out / "adapter" / "adapter_model.safetensors")
    assert plan["lora_parameters"] == sum(t.numel() for t in adapter.values())


def test_plan_human_output(ci_bake, no_weights):
    from typer.testing import CliRunner

    from promptbake.cli import app

    result = CliRunner().invoke(app, ["plan", "--config", str(ci_bake.config)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    for row in ("model", "device", "prompts", "system prompt", "prefix reuse", "per step", "peak memory (est.)",
                "wall time (est.)", "bake key", "up to date: distill will skip the bake"):
        assert row in text, row


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "error: --steps must be at least 1 (got 0)."),
    (["--kl-topk", "100000"], "is larger than the vocabulary"),
    (["--lora-targets", "nonexistent_proj"], "error: --lora-targets nonexistent_proj:"),
    (["--steps", "3"], "already exists; pass --overwrite to replace it"),
])
def test_plan_refuses_what_distill_refuses(ci_bake, no_weights, tmp_path, extra, message):
    if "already exists" not in message:  # another key: ci_bake's --out would be refused first
        extra = [*extra, "--out", tmp_path / "fresh"]
    plan = invoke("plan", "--config", ci_bake.config, *extra)
    distill = invoke("distill", "--config", ci_bake.config, *extra)
    assert plan.exit_code == distill.exit_code == 2
    plan_error = [line for line in plan.stderr.splitlines() if line.startswith("error:")]
    distill_error = [line for line in distill.stderr.splitlines() if line.startswith("error:")]
    assert plan_error == distill_error and message in plan.stderr.replace("\n", " ")


def test_plan_with_a_missing_prompt_file(tiny_model, tmp_path):
    result = invoke("plan", "--model", tiny_model, "--prompt", tmp_path / "nope.txt", "--out", tmp_path / "o",
                    "--json")
    assert result.exit_code == 2
    answer = json.loads(result.stdout)
    assert answer["ok"] is False and answer["exit_code"] == 2
    assert answer["error"] == f"error: system prompt file {tmp_path / 'nope.txt'} does not exist."
    assert not (tmp_path / "o").exists()


def test_cut_config_keeps_the_first_layers_and_their_kinds():
    from tiny import build_gemma3_model

    from promptbake.timing import cut_config

    config = build_gemma3_model(vocab_size=300).config
    kinds = list(config.layer_types)
    cut = cut_config(config, 3)
    assert cut.num_hidden_layers == 3 and cut.layer_types == kinds[:3]
    assert config.num_hidden_layers == 4 and config.layer_types == kinds  # the model's own config is untouched


def test_full_depth_is_the_shallow_copy_plus_the_measured_cost_per_layer(monkeypatch, tiny_model, prompt_files):
    """time_bake's arithmetic, with the two copies' timings fixed: a per-layer slope from 1 and 8 layers."""
    from rich.console import Console

    from promptbake import timing
    from promptbake.config import DistillConfig
    from promptbake.setup import read_inputs, read_model_files

    assert (timing.SHALLOW, timing.DEEP) == (1, 8)
    times = {1: timing.StepTimes({"rollout": 1.0, "teacher": 0.2, "student": 0.5, "optim": 0.1}, 0.6),
             8: timing.StepTimes({"rollout": 1.7, "teacher": 0.9, "student": 4.0, "optim": 0.1}, 2.0)}
    monkeypatch.setattr(timing, "time_cut", lambda cfg, config, renderer, train, layers, **kw: times[layers])
    system, prompts = prompt_files
    cfg = DistillConfig(model=str(tiny_model), prompt=str(system), prompts=str(prompts), steps=10, batch_size=2,
                        heldout_prompts=5)
    _, renderer, config, _, train, heldout, vocab = read_model_files(cfg, read_inputs(cfg), Console(quiet=True))
    config.num_hidden_layers = 15  # a deeper model of the same shapes: 14 layers past the shallow copy
    wall = timing.time_bake(cfg, config, renderer, train, 20, vocab=vocab, device=None, dtype=None, quant="4bit")
    # Per layer (over the 7 between the copies): rollout 0.1, teacher 0.1, student 0.5, optim 0.
    assert wall["per_step_phases"] == {"rollout": 2.4, "teacher": 1.6, "student": 7.5, "optim": 0.1}
    assert wall["per_step"] == pytest.approx(11.6) and wall["training"] == pytest.approx(116.0)
    held_batch = 0.6 + 14 * 0.2  # 3.4 s for 2 x batch rows
    assert wall["heldout_kl"] == pytest.approx(2 * 2 * held_batch)  # 5 prompts, 4 rows a batch: 2 batches, twice
    assert wall["closing_eval"] == pytest.approx(2 * 8 * held_batch)  # min(20, 16) prompts, 2 at a time
    assert "with 1 and 8 of its 15 layers" in wall["how"] and "unquantised: the bake's base is 4bit" in wall["how"]


def test_an_up_to_date_bake_is_not_timed(ci_bake, no_weights, monkeypatch):
    """distill would skip it, so plan says so at once instead of timing a step (a CI plan stays quick)."""
    from promptbake import timing

    monkeypatch.setattr(timing, "time_cut", lambda *a, **kw: pytest.fail("timed a bake that distill skips"))
    plan = json.loads(invoke("plan", "--config", ci_bake.config, "--json").stdout)
    assert plan["will_bake"] is False and plan["wall_seconds"] is None


def test_plan_memory_follows_the_settings_that_lower_it(ci_bake, no_weights):
    """--micro-batch-size and --gradient-checkpointing shrink the student backward's activations in the
    estimate as they do in the bake (the estimate is memory.estimate_peak_memory's); nothing else moves."""
    def memory(*extra):
        return json.loads(invoke("plan", "--config", ci_bake.config, "--json", "--overwrite", *extra).stdout)["memory_mb"]

    full, lowered = memory(), memory("--micro-batch-size", "1", "--gradient-checkpointing", "on")
    assert lowered["activations"] < full["activations"] / 2
    for part in ("weights", "rollout_copy", "lora_and_optimizer", "rollout_kv_cache", "teacher_pass", "loss_chunk"):
        assert lowered[part] == full[part], part


def test_plan_says_when_the_bake_will_not_fit_this_machine(ci_bake, no_weights, monkeypatch):
    """A bake estimated past this machine's free memory gets a note with what to lower, and the copies it
    would time are not built when they would not fit either (plan must not take the machine down itself)."""
    from promptbake import plan as plan_module, timing

    monkeypatch.setattr(timing, "time_cut", lambda *a, **kw: pytest.fail("timed copies that do not fit"))
    monkeypatch.setattr(plan_module, "free_memory", lambda device: 2**20)  # 1 MiB free
    result = invoke("plan", "--config", ci_bake.config, "--json", "--force")
    plan = json.loads(result.stdout)
    assert plan["memory_mb"]["free"] == 1.0 and plan["wall_seconds"] is None
    assert plan["wall_why"].startswith("not timed: the copy cut to 2 layers it would time needs ~")
    note = next(n for n in plan["notes"] if n.startswith("the estimated peak"))
    assert "is more than the 1.0 MiB of memory free on this machine; to lower it: " in note
    assert "--gradient-checkpointing on: peak" in note  # memory.advice's first, free change
