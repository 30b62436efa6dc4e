"""Code rows from the tokens they stand for (variants.code_rows=step_tokens), checked against the
base checkpoint's own tables read with safetensors and averaged in numpy."""
import json

import numpy as np
import pytest

from abscot_jax import variants as V
from abscot_jax.checkpoint import load_hf
from abscot_jax.code_rows import set_code_rows, step_token_weights
from abscot_jax.errors import ConfigError
from abscot_jax.config import load_config
from abscot_jax.stages.traces import phase_traces
from abscot_jax.stages.training import train_phase
from tests.test_m_step import toy_run

CODE_ROWS = ["variants.round1_traces=cot_codes", "variants.code_layer=0", "variants.step_separator=true",
             "variants.code_rows=step_tokens"]


def tables(hf_dir):
    """(embedding [V, D], head [V, D] or None when tied) of an HF checkpoint, float64."""
    from safetensors.numpy import load_file

    weights = {k: v.astype(np.float64) for f in sorted(hf_dir.glob("*.safetensors"))
               for k, v in load_file(str(f)).items()}
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    return embed, weights.get("lm_head.weight")


def expected_rows(run, traces, table):
    """Code id -> the mean over the steps it encodes of the mean row of the step's tokens."""
    builder, per_code = run.builder(), {}
    for e in run.split("round_1_a"):
        c, spans = V.step_spans(builder, e)
        for j, (a, b) in enumerate(spans[:len(traces[e.id]) // 2]):  # steps past m_max have no code
            per_code.setdefault(traces[e.id][2 * j], []).append(table[c[a:b]].mean(0))  # code, then separator
    return {code: np.mean(steps, axis=0) for code, steps in per_code.items()}


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_untied_sharded_hf_dir"])
def test_each_code_row_is_the_mean_of_its_steps_tokens(tmp_path, fixture, request):
    run = toy_run(tmp_path, request.getfixturevalue(fixture), *CODE_ROWS)
    phase_traces(run, 1, "a", "cot_codes")
    traces = json.loads((run.round_dir(1) / "traces_a.json").read_text())
    model = load_hf(run.dir / "base")
    weights = step_token_weights(run.builder(), run.split("round_1_a"), traces, 2, 1, len(run.tokenizer))
    set_code_rows(model, weights)

    embed, head = tables(run.dir / "base")
    expected = expected_rows(run, traces, embed)
    assert set(weights) == set(expected) and len(expected) > 1
    ids = sorted(expected)
    got = np.asarray(model.embed[...], np.float64)
    # fp32 sums of at most a few hundred fp32 rows: relative error a few ulp of float32 each
    np.testing.assert_allclose(got[ids], np.stack([expected[i] for i in ids]), rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(len(got)), ids)  # the separator, unused codes, every other token
    np.testing.assert_array_equal(got[others], embed[others])
    if head is None:
        assert model.lm_head is None
    else:
        expected_head = expected_rows(run, traces, head)
        got_head = np.asarray(model.lm_head[...], np.float64).T  # [V, D] as stored by HF
        np.testing.assert_allclose(got_head[ids], np.stack([expected_head[i] for i in ids]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_head[others], head[others])


@pytest.mark.slow
def test_phase_a_starts_from_the_code_rows(tmp_path, tiny_hf_dir):
    """With a learning rate of 1e-12 Phase A's exported model is its starting point to within
    steps x 1e-12 (an Adam step moves a weight by at most about the learning rate): the code rows set."""
    run = toy_run(tmp_path, tiny_hf_dir, *CODE_ROWS, "optim.learning_rate=1e-12", "train.mode=full",
                  "data.examples_per_phase=16", "train.batch_size=8", rows=40)
    phase_traces(run, 1, "a", "cot_codes")
    traces = json.loads((run.round_dir(1) / "traces_a.json").read_text())
    summary = train_phase(run, 1, "a")
    embed, _ = tables(run.dir / "base")
    expected = expected_rows(run, traces, embed)
    trained, _ = tables(run.round_dir(1) / "model_a")
    assert summary["code_rows_set"] == len(expected)
    ids = sorted(expected)
    np.testing.assert_allclose(trained[ids], np.stack([expected[i] for i in ids]), rtol=1e-5, atol=1e-6)


def test_code_rows_need_cot_codes_and_a_known_name():
    for without_phase_a_codes in ([], ["variants.round1_traces=cot_codes", "variants.curriculum=stepwise"],
                                  ["variants.round1_traces=cot_codes", "variants.trace_source=pause"]):
        with pytest.raises(ConfigError, match="needs variants.round1_traces=cot_codes, no curriculum"):
            load_config(None, ["variants.code_rows=step_tokens", *without_phase_a_codes])
    with pytest.raises(ConfigError, match="variants.code_rows must be"):
        load_config(None, ["variants.round1_traces=cot_codes", "variants.code_rows=digits"])
