"""Memory plan: bytes per device for a training config, and whether it fits.

`python -m abscot_jax.plan --config FILE [--set k=v ...] [--hf-config qwen3-4b | DIR | config.json]
[--devices N] [--device-memory 80GB | h100 | ...]` prints parameters, gradients, optimizer state and
activations per device for that config and mesh (`abscot_jax.plan.memory_plan`), and says whether
they fit. It sizes the devices named on the command line; they need not exist on this machine.
With rl.enabled (e.g. `--set rl.enabled=true`) it sizes the rl stage too (`abscot_jax.plan.rl`): the
sampler's KV cache and prompt pass, the reference policy and the GRPO update, with the largest
rl.rollout_batch that fits; a configured rl.rollout_batch that does not fit is an error (exit 2).
"""
from __future__ import annotations

import argparse
import math
import sys

from abscot_jax.config import RunConfig, load_config
from abscot_jax.errors import ConfigError
from abscot_jax.model.config import Qwen3Config
from abscot_jax.plan import GiB, PRESETS, MemoryPlan, load_model_config, memory_plan
from abscot_jax.plan.rl import RLPlan, largest_rollout_batch, rl_plan

# Memory per device by kind, in GiB, as the driver reports it (nvidia-smi's total; Google's HBM figures).
DEVICE_KINDS = {
    "a100-40gb": 40.0, "a100-80gb": 80.0, "h100": 81559 / 1024, "h200": 143771 / 1024,
    "tpu-v4": 32.0, "tpu-v5e": 16.0, "tpu-v5p": 95.0, "tpu-v6e": 32.0,
}


def parse_device_memory(text: str) -> tuple[float, str]:
    """`--device-memory`: a device kind, or a size such as 80GB, 80GiB or 80 (all GiB: GPU memory is
    sold in binary gigabytes, an "80GB" card has 80 GiB or just under). Returns (GiB, description)."""
    kind = text.strip().lower()
    if kind in DEVICE_KINDS:
        return DEVICE_KINDS[kind], f"{kind}: {DEVICE_KINDS[kind]:.1f} GiB"
    number = kind.removesuffix("gib").removesuffix("gb").strip()
    try:
        gib = float(number)
    except ValueError:
        raise ConfigError(f"--device-memory {text}: not a size (80GB, 80GiB, 80) nor a device kind "
                          f"({', '.join(DEVICE_KINDS)})") from None
    if gib <= 0:
        raise ConfigError(f"--device-memory {text}: must be more than 0")
    return gib, f"{gib:g} GiB"


def devices_for(run: RunConfig, devices: int | None) -> int:
    """The device count to size: --devices, else what the config's mesh names (1 when an axis is -1).
    A mesh whose sizes are all fixed must use exactly --devices."""
    m = run.mesh
    sizes = (m.data, m.fsdp, m.tensor)
    fixed = -1 not in sizes
    if devices is None:
        return math.prod(sizes) if fixed else 1
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    if fixed and math.prod(sizes) != devices:
        raise ConfigError(f"the config's mesh data={m.data} x fsdp={m.fsdp} x tensor={m.tensor} uses "
                          f"{math.prod(sizes)} devices, not --devices {devices}; set the mesh for {devices} "
                          f"(e.g. --set mesh.fsdp=-1) or leave --devices out")
    return devices


def format_plan(plan: MemoryPlan, cfg: Qwen3Config, run: RunConfig, device_memory_gib: float | None,
                device: str = "") -> str:
    """The plan as a table; with `device_memory_gib`, a verdict against that much memory per device
    (`device` describes it: "h100: 79.6 GiB")."""
    t = run.train
    data, fsdp, tensor = plan.mesh
    lines = [
        f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
        f"({cfg.num_key_value_heads} kv) x {cfg.head_dim}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}"
        f"{', tied' if cfg.tie_word_embeddings else ''}",
        f"run: {t.mode}{f' r={run.lora.rank}' if t.mode == 'lora' else ''}, params {run.model.param_dtype}, "
        f"compute {run.model.compute_dtype}, remat {run.model.remat}, attention {run.model.attention_impl}, "
        f"seq {t.seq_len}, batch {t.batch_size} x accum {t.grad_accum}, loss chunk {t.loss_chunk}",
        f"mesh: data {data} x fsdp {fsdp} x tensor {tensor} = {data * fsdp * tensor} devices"
        f"{f' ({device} each)' if device else ''}",
        "",
        f"{'per device':<52}{'GiB':>10}",
    ]
    rows = [
        ("parameters: frozen", plan.frozen_params),
        ("parameters: trainable", plan.trainable_params),
        ("weights in compute dtype / gathered", plan.compute_copy),
        ("gradients", plan.gradients),
        ("optimizer state (AdamW m, v)", plan.optimizer),
        ("activations", plan.activations),
        *((f"  {name}", value) for name, value in plan.activation_terms.items()),
    ]
    lines += [f"{name:<52}{value / GiB:>10.2f}" for name, value in rows]
    lines.append(f"{'total':<52}{plan.total / GiB:>10.2f}")
    lines += [f"note: {n}" for n in plan.notes]
    if device_memory_gib:
        fraction = t.device_memory_fraction
        budget = budget_bytes(run, device_memory_gib)
        verdict = "fits" if plan.total <= budget else "does not fit"
        lines.append(f"{verdict}: {plan.total / GiB:.1f} of {budget / GiB:.1f} GiB per device "
                     f"({100 * plan.total / budget:.0f}%; train.device_memory_fraction={fraction:g} "
                     f"of {device_memory_gib:.1f} GiB)")
        if budget < plan.total <= device_memory_gib * GiB:
            lines.append(f"note: it would fit with train.device_memory_fraction="
                         f"{min(1.0, math.ceil(100 * plan.total / (device_memory_gib * GiB)) / 100):g}")
    return "\n".join(lines)


def budget_bytes(run: RunConfig, device_memory_gib: float) -> float:
    """What XLA may take of each device (the train command sets train.device_memory_fraction)."""
    return run.train.device_memory_fraction * device_memory_gib * GiB


def format_rl_plan(plan: RLPlan, run: RunConfig, budget: float, largest: int) -> str:
    """The rl stage's figures per device and whether rl.rollout_batch fits `budget` bytes."""
    rl = run.rl
    lines = [
        "",
        f"rl stage: {rl.prompts_per_step} prompts x {rl.rollouts_per_prompt} rollouts a step, rl.rollout_batch "
        f"{plan.rollout_batch} ({plan.rows} rows per device), prompts <= {run.rl_prompt_limit()} tokens + "
        f"{rl.max_new_tokens} new: {plan.prompt_positions} + {plan.positions - plan.prompt_positions} cache positions",
        f"{'per device':<52}{'GiB':>10}",
    ]
    rows = [
        ("parameters and optimizer state", plan.persistent - plan.reference),
        ("reference policy" + (" (zeroed adapters)" if run.train.mode == "lora" else " (frozen copy)"), plan.reference),
        ("sampling: KV cache", plan.kv_cache),
        ("sampling: prompt pass attention (one layer)", plan.prompt_scores),
        ("sampling: weights in compute dtype for decoding", plan.decode_weights),
        ("training: gradients (accumulator + micro-batch)", plan.gradients),
        ("training: activations, weights in compute dtype", plan.step.activations + plan.step.compute_copy),
    ]
    lines += [f"{name:<52}{value / GiB:>10.2f}" for name, value in rows]
    lines.append(f"{'rl total (persistent + larger of sampling, training)':<52}{plan.total / GiB:>10.2f}")
    verdict = "fits" if plan.total <= budget else "does not fit"
    rollouts = rl.prompts_per_step * rl.rollouts_per_prompt
    lines.append(f"rl {verdict}: {plan.total / GiB:.1f} of {budget / GiB:.1f} GiB per device; the largest "
                 f"rl.rollout_batch that fits: {largest or 'none'}"
                 + (f" (all {rollouts} rollouts of a step at once)" if largest == rollouts else ""))
    return "\n".join(lines)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, [], False) else super()._get_help_string(action)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abscot_jax.plan", description=__doc__.splitlines()[0],
                                     formatter_class=_Help)
    parser.add_argument("--config", help="run config YAML (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.seq_len=4096; repeatable")
    parser.add_argument("--hf-config", help=f"architecture: a preset ({', '.join(PRESETS)}), a config.json or "
                                            "an HF model directory (default: model.hf_dir)")
    parser.add_argument("--devices", type=int,
                        help="how many devices to size for; they need not exist here "
                             "(default: the number the config's mesh names, 1 when an axis is -1)")
    parser.add_argument("--device-memory", default="h100",
                        help=f"memory per device: a size (80GB, 80GiB and 80 all mean 80 GiB) or a device kind "
                             f"({', '.join(DEVICE_KINDS)})")
    args = parser.parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
        option, source = ("--hf-config", args.hf_config) if args.hf_config else ("model.hf_dir", run.model.hf_dir)
        if not source:
            raise ConfigError("no architecture: pass --hf-config (a preset such as qwen3-4b, or a config.json)")
        devices = devices_for(run, args.devices)
        device_memory_gib, device = parse_device_memory(args.device_memory)
        cfg = load_model_config(source, run, option)
        plan = memory_plan(cfg, run, devices)
        budget = budget_bytes(run, device_memory_gib)
        if run.rl.enabled:
            rl, largest = rl_plan(cfg, run, devices), largest_rollout_batch(cfg, run, devices, budget)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg, run, device_memory_gib, device))
    if run.rl.enabled:
        print(format_rl_plan(rl, run, budget, largest))
        if rl.total > budget:
            if largest:
                fix = f"set rl.rollout_batch={largest}"
            elif rl.persistent + rl.training > budget:
                fix = "the update alone does not fit: use more devices, LoRA or a shorter train.seq_len"
            else:
                fix = "not even one rollout row fits: lower rl.max_prompt_tokens or rl.max_new_tokens"
            print(f"error: rl.rollout_batch={rl.rollout_batch} does not fit: the rl stage needs {rl.total / GiB:.1f} "
                  f"of {budget / GiB:.1f} GiB per device (KV cache {rl.kv_cache / GiB:.1f}, prompt pass "
                  f"{rl.prompt_scores / GiB:.1f}); {fix}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
