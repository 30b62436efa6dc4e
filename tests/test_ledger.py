"""The ledger's plan and bookkeeping, without running a stage (tests/test_rounds.py runs them)."""
import pytest

from abscot_jax import rounds
from abscot_jax.config import load_config
from abscot_jax.errors import RunError


def test_stage_plan_follows_the_config():
    cfg = load_config(None, ["rounds=2", "data.warmup_examples=4", "eval.baselines=[verbal,direct]",
                             "variants.round1_traces=cot_codes", "variants.trace_selection=best_of_k"])
    keys = [s.key for s in rounds.setup_stages(cfg)]
    assert keys == ["prepare_base", "warmup", "baseline_verbal", "baseline_direct"]
    round_2 = {s.key: s for s in rounds.round_stages(cfg, 2)}
    assert list(round_2) == [f"round_2/{name}" for name in rounds.ROUND_STAGES]
    assert round_2["round_2/traces_a"].args == {"t": 2, "phase": "a", "source": "best_of_k"}
    assert round_2["round_2/traces_a"].reads == ("round_1/model_b",)  # round 1's final model
    assert round_2["round_2/phase_b"].reads == ("round_2/model_a", "round_2/traces_b.json")
    assert round_2["round_2/phase_b"].checkpoints == "round_2/phase_b/checkpoints"
    assert rounds.find_stage(cfg, "round_1/traces_a").args["source"] == "cot_codes"
    assert rounds.find_stage(cfg, "round_1/traces_a").reads == ("warmup/model",)
    with pytest.raises(RunError, match="no stage 'round_3/eval' in this run"):
        rounds.find_stage(cfg, "round_3/eval")


def test_stages_beside_an_out_of_process_engine_keep_jax_off_the_accelerators():
    cfg = load_config(None, ["sampler.engine=vllm", "sampler.python=/bin/true", "rounds=2"])
    on_accelerator = {s.key: s.accelerator for s in rounds.setup_stages(cfg) + rounds.round_stages(cfg, 2)}
    assert on_accelerator == {"prepare_base": True, "baseline_verbal": False, "round_2/traces_a": False,
                              "round_2/phase_a": True, "round_2/traces_b": False, "round_2/phase_b": True,
                              "round_2/eval": False}
    best_of_k = load_config(None, ["sampler.engine=vllm", "sampler.python=/bin/true", "rounds=2",
                                   "variants.trace_selection=best_of_k"])
    assert rounds.find_stage(best_of_k, "round_2/traces_a").accelerator  # it scores the samples in JAX


def test_changed_settings_name_each_key_and_ignore_how_a_run_executes():
    before = {"name": "a", "train": {"seq_len": 128, "checkpoint_every": 10}, "optim": {"learning_rate": 1e-4}}
    now = {"name": "a", "train": {"seq_len": 256, "checkpoint_every": 5, "loss_chunk": 512},
           "optim": {"learning_rate": 1e-4}}
    # seq_len changed; checkpoint_every is an execution key; loss_chunk is new since the run was made
    assert rounds.changed_settings(before, now) == ["train.seq_len: 128 -> 256"]


def test_a_stage_whose_inputs_are_missing_is_refused_before_it_starts(tmp_path, monkeypatch):
    cfg = load_config(None, [f"run_dir={tmp_path}", "name=r"])
    ledger = rounds.Ledger(cfg)
    monkeypatch.setattr(rounds, "launch", lambda *_: pytest.fail("a stage process was started"))
    with pytest.raises(RunError, match=r"stage round_1/phase_b needs round_1/model_a, round_1/traces_b.json"):
        ledger.run(rounds.find_stage(cfg, "round_1/phase_b"))
    assert "round_1/phase_b" not in ledger.state["done"]
