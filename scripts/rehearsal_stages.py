"""The stages of scripts/rehearse_qwen3_4b.py that run in a process of their own
(`rehearse_qwen3_4b.py ... --stage NAME`; what each does: that script's docstring). Each imports
what it needs when it runs, so the driver that imports this module stays small."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN3_4B_CONFIG = {  # Qwen3-4B's config.json, less what abscot_jax.plan.PRESETS holds
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": 36, "rope_scaling": None,
    "sliding_window": None, "use_cache": True, "use_sliding_window": False,
}
LOGIT_TOKENS = 64


class StageError(RuntimeError):
    """A stage that did not do what it must; the driver reports it in one `error:` line."""


def write_random_hf(cfg, out_dir: Path, *, dtype: str, tokenizer_dir: Path, max_shard_size: str = "4GB",
                    base_config: dict | None = QWEN3_4B_CONFIG) -> None:
    """A random HF checkpoint (weights N(0, 0.02), norms 1 + N(0, 0.1)) written one tensor at a time,
    sharded as the hub shards Qwen3-4B (4 GB files: 3.96, 3.98 and 0.10 GB in bf16)."""
    import numpy as np

    from abscot_jax.checkpoint.hf import write_hf_dir
    from abscot_jax.model.hf_names import hf_tensor_specs

    rng = np.random.default_rng(0)

    def tensors():
        for spec in hf_tensor_specs(cfg):
            hf_name, shape = spec.hf_name, spec.shape
            if len(shape) == 1:
                yield hf_name, 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
            else:
                yield hf_name, 0.02 * rng.standard_normal(shape, np.float32)

    write_hf_dir(cfg, tensors(), out_dir, dtype=dtype, max_shard_size=max_shard_size, base_config=base_config,
                 tokenizer_dir=tokenizer_dir)


def stage_source(args):
    from abscot_jax.model.config import Qwen3Config
    from abscot_jax.plan import PRESETS

    cfg = Qwen3Config.from_hf_dict({**PRESETS["qwen3-4b"], "num_hidden_layers": args.layers})
    write_random_hf(cfg, args.out / "source", dtype="bfloat16", tokenizer_dir=args.out / "tokenizer")


def stage_vocab(args):
    """As the driver's prepare_base, from the converted checkpoint."""
    from transformers import AutoTokenizer

    from abscot_jax.checkpoint import load_checkpoint, save_hf
    from abscot_jax.vocab import prepare_model_vocab

    model = load_checkpoint(args.out / "ckpt")
    rows = model.config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(str(args.out / "ckpt"))
    _, initialised = prepare_model_vocab(model, tokenizer)
    if not initialised or model.config.vocab_size != rows:
        raise StageError(f"abstract rows initialised={initialised}, rows {rows} -> {model.config.vocab_size}")
    save_hf(model, args.out / "base", tokenizer=tokenizer, dtype="bfloat16")


def run_config(args):
    from abscot_jax.config import load_config

    return load_config(REPO / "configs/qwen3_4b_lora.yaml", [
        f"model.hf_dir={args.out / 'base'}", f"train.seq_len={args.seq_len}", f"train.batch_size={args.fsdp}",
        "train.grad_accum=1", f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}",
        "train.keep_checkpoints=2", "train.peak_tflops_per_device=0", "data.m_max=16",
        "mesh.data=1", f"mesh.fsdp={args.fsdp}", f"mesh.tensor={args.tensor}"])


def phase_a_examples(args, cfg):
    """(the base's tokenizer, a SequenceBuilder, the Dolci examples, their Phase A sequences with
    round-1 random traces)."""
    from transformers import AutoTokenizer

    from abscot_jax.data.dolci import load_dolci
    from abscot_jax.data.sequences import BuildConfig, SequenceBuilder

    tokenizer = AutoTokenizer.from_pretrained(str(args.out / "base"))
    examples, _ = load_dolci(args.out / "dolci_rows.jsonl")
    builder = SequenceBuilder(tokenizer, BuildConfig(seq_len=cfg.train.seq_len, m_max=cfg.data.m_max))
    return tokenizer, builder, examples, builder.build_all(examples, "A")


def stage_train(args):
    import jax
    import numpy as np
    import psutil
    from flax import nnx

    from abscot_jax.checkpoint import load_hf
    from abscot_jax.checkpoint.hf import abstract_model
    from abscot_jax.model.lora import apply_lora
    from abscot_jax.plan import load_model_config, memory_plan
    from abscot_jax.sharding import make_mesh, state_shardings
    from abscot_jax.train.runner import run_phase
    from abscot_jax.vocab import abstract_vocab

    # Not the train command's host-memory policy (abscot_jax/hostmem.py): at this shape on 8 host
    # devices its heap grew by the step's temporaries at every step (2 layers: +3.4 GB a step).
    cfg = run_config(args)
    m = cfg.model
    tokenizer, _, _, sequences = phase_a_examples(args, cfg)
    mesh = make_mesh(cfg.mesh)
    base = args.out / "base"
    arch = load_model_config(str(base), cfg)
    baseline = psutil.Process().memory_info().rss
    # As Run.load_for_training, but each parameter read straight into its place on the mesh: loaded
    # on one device and then moved (the driver's way), the host would hold the 8 GB base twice.
    shardings = state_shardings(abstract_model(arch)[1], mesh).to_pure_dict()
    model = load_hf(base, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
                    attention_impl=m.attention_impl, shardings=shardings)
    new_ids = abstract_vocab(tokenizer).all_new_ids
    apply_lora(model, cfg.lora, new_token_start=min(new_ids), num_new_tokens=len(new_ids), seed=cfg.train.seed)
    phase = args.out / args.which
    trained, summary = run_phase(model, sequences, cfg, phase, mesh, progress=False, base_dir=base)
    adapters = jax.tree_util.tree_leaves_with_path(nnx.state(trained, nnx.LoRAParam).to_pure_dict())
    np.savez(phase / "final_adapters.npz", **{jax.tree_util.keystr(p): np.asarray(value) for p, value in adapters})
    plan = memory_plan(arch, cfg, jax.device_count())
    steps = [json.loads(line)["seconds"] for line in (phase / "metrics.jsonl").read_text().splitlines()]
    (args.out / f"{args.which}.json").write_text(json.dumps({"step_seconds": steps,
        **summary, "baseline_rss": baseline, "plan_bytes": plan.total * jax.device_count(),
        "rows_of_examples": len(sequences), "mesh": dict(mesh.shape)}, indent=1))


def logit_tokens(args):
    """The first LOGIT_TOKENS tokens of the Phase A sequences (prompt, CoT, trace and answer)."""
    import numpy as np

    sequences = phase_a_examples(args, run_config(args))[3]
    return np.concatenate([s.tokens for s in sequences])[:LOGIT_TOKENS].astype(np.int32)


def stage_hf_logits(args):
    """transformers' logits in bf16, then the exact reference: the same bf16 weights run in fp32, each
    decoder layer cast just before its forward and dropped after it (fp32 never holds the model:
    loaded in fp32 it would hold 16 GB beside the 8 GB memory-mapped file)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.out / "export"), dtype=torch.bfloat16).eval()
    tokens = torch.as_tensor(logit_tokens(args)[None], dtype=torch.long)
    with torch.no_grad():
        np.save(args.out / "logits_hf_bf16.npy", model(tokens).logits[0].float().numpy())
        for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
            module.float()
        for layer in model.model.layers:  # a hook that returns None leaves inputs and outputs alone
            layer.register_forward_pre_hook(lambda module, _: module.float() and None)
            layer.register_forward_hook(lambda module, *_: module.to("meta") and None)
        np.save(args.out / "logits_hf_fp32.npy", model(tokens).logits[0].float().numpy())


def stage_jax_logits(args):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from abscot_jax.checkpoint import load_hf
    from abscot_jax.data.roles import Role

    model = load_hf(args.out / "export", param_dtype="bfloat16", compute_dtype="bfloat16")
    tokens = jnp.asarray(logit_tokens(args)[None])
    positions = jnp.arange(tokens.shape[1])[None]
    ones = jnp.ones_like(tokens)  # one segment, every role PROMPT: the mask is plain causal, as transformers'
    forward = nnx.jit(lambda model: model(tokens, positions, ones, ones * int(Role.PROMPT)))
    ours = np.asarray(forward(model)[0], np.float32)
    theirs, exact = (np.load(args.out / f"logits_hf_{name}.npy") for name in ("bf16", "fp32"))
    diff = float(np.abs(ours - theirs).max())
    result = {"logits_max_abs_diff": diff, "tolerance": 3 * float(np.abs(theirs - exact).max()),
              "ours_vs_fp32": float(np.abs(ours - exact).max()), "theirs_vs_fp32": float(np.abs(theirs - exact).max()),
              "logit_scale": float(np.abs(exact).max()),
              "same_top_token": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}
    (args.out / "logits.json").write_text(json.dumps(result, indent=1))
    if diff > result["tolerance"]:
        raise StageError(f"logits disagree: max abs diff {diff:.4f} > tolerance {result['tolerance']:.4f} "
                         f"(3x transformers' own bf16 error)")


def stage_sample(args):
    from abscot_jax.sampling.engines import local_engine
    from abscot_jax.sampling.protocol import SamplingRequest

    cfg = run_config(args)
    _, builder, examples, _ = phase_a_examples(args, cfg)
    engine = local_engine("jax", args.out / "export", dtype="bfloat16")
    m_min, m_max = 4, cfg.data.m_max
    requests = [SamplingRequest(id=e.id, prompt_ids=builder.prompt_ids(e), mode="trace", temperature=1.0,
                                m_min=m_min, m_max=m_max, max_new_tokens=m_max + 2, seed=i)
                for i, e in enumerate(examples[:2])]
    results = engine.run_requests(requests)
    abstract = set(builder.vocab.abstract_ids)
    for r in results:
        if r.finish_reason != "stop" or not m_min <= r.trace_length <= m_max or not abstract.issuperset(r.trace_ids):
            raise StageError(f"trace for {r.id}: finish {r.finish_reason}, {r.trace_length} tokens, {r.error or r.text}")
    (args.out / "traces.json").write_text(json.dumps({r.id: r.text for r in results}, indent=1))
    for r in results:
        print(f"{r.id}: {r.text}")


CHILD_STAGES = {"source": stage_source, "vocab": stage_vocab, "train": stage_train, "hf_logits": stage_hf_logits,
                "jax_logits": stage_jax_logits, "sample": stage_sample}

