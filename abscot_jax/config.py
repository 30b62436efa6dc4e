"""Typed run configuration: dataclasses, filled from YAML files and `--set a.b=value` overrides.

YAML only sets values; every field, its type and its default live in the dataclasses: the sections
here, plus the library's own `LoRAConfig` (lora) and `MeshConfig` (mesh). Mistakes (unknown key,
wrong type, bad value) raise `ConfigError` with one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from abscot_jax.data.sequences import BuildConfig
from abscot_jax.errors import ConfigError
from abscot_jax.layouts import LAYOUTS
from abscot_jax.model.config import REMAT_POLICIES
from abscot_jax.model.lora import LoRAConfig
from abscot_jax.rl import DATA_FORMATS, MODES as RL_MODES, REWARDS
from abscot_jax.sharding import MeshConfig
from abscot_jax.trace_sources import PHASE_B_SOURCES, ROUND1_SOURCES, SELECTIONS


@dataclasses.dataclass
class ModelSection:
    hf_dir: str = ""  # base model: an HF directory or an Orbax checkpoint from convert/hf_to_flax.py
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # What each layer keeps for its backward; the rest is recomputed there (a layer's input is always kept):
    #   none: everything (no recomputation; the most memory)
    #   layer: nothing more (the whole layer is recomputed; the least memory)
    #   dots: the q, k, v, o, gate and up projections' outputs (LoRA included); norms, RoPE, attention
    #         and SiLU are recomputed
    #   attention: the attention output; the projections, norms, MLP and attention's own residuals are recomputed
    remat: str = "none"
    # xla (dense reference) | blockwise (CPU) | pallas (fused, GPU) | cudnn | auto (pallas on a GPU,
    # blockwise on CPU); see docs/BENCHMARKS.md "Training step (CPU)" for why the default stays xla
    attention_impl: str = "xla"
    add_abstract_vocab: bool = True  # extend the tokenizer and (re)initialise the new rows
    new_row_sigma: float = 0.02


@dataclasses.dataclass
class OptimSection:
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass
class TrainSection:
    mode: str = "lora"  # lora | full
    train_embedding: bool = False  # full mode: also train the (whole) embedding / head
    seq_len: int = 1024
    batch_size: int = 4  # packed rows per optimizer step and micro-batch (global)
    grad_accum: int = 1
    epochs: int = 1
    phase_b_epochs: int = 0  # Phase B's epochs (each curriculum sub-phase's); 0 = epochs
    max_steps: int = 0  # 0 = run the epochs through
    seed: int = 0
    loss_chunk: int = 1024  # tokens per chunk of the cross-entropy (never the full [B, T, V] logits)
    loss_on_trace: bool = True
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = the device kind's datasheet figure (abscot_jax/train/flops.py)
    # Share of each accelerator's memory XLA may take (XLA_PYTHON_CLIENT_MEM_FRACTION, set by the train
    # command before JAX starts; JAX's own default is 0.75, below full fine-tuning's plan on 80 GB).
    device_memory_fraction: float = 0.92


@dataclasses.dataclass
class DataSection:
    train: str = "allenai/Dolci-Think-SFT-7B"  # Dolci-Think hub id or local JSONL/parquet file
    eval: str = "HuggingFaceH4/MATH-500"  # MATH-500 hub id or a local file in its schema
    examples_per_phase: int = 5000  # each round's Phase A and Phase B get their own disjoint subset
    warmup_examples: int = 0  # > 0: first teach the base model the verbal-CoT format (the demo does)
    max_rows: int = 0  # read at most this many training rows (0 = all)
    system: str = ""  # training system line ("" = the rows' own messages)
    cut_policy: str = "head_tail"  # drop | head | head_tail, when a Phase A CoT does not fit seq_len
    m_max: int = 128


@dataclasses.dataclass
class SamplerSection:
    engine: str = "jax"  # jax (in process) | hf | vllm (out of process, exported HF directories)
    python: str = ""  # vllm: the Python of the environment that has vllm
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # vllm: share of each GPU it may take
    dtype: str = "bfloat16"  # vllm: the dtype it computes in (auto: the checkpoint's)
    trace_temperature: float = 1.0  # sampling the training traces (Phase A rounds >= 2, Phase B)
    m_min: int = 1
    max_batch: int = 32


@dataclasses.dataclass
class EvalSection:
    limit: int = 0  # evaluate the first N problems (0 = all)
    samples: int = 1  # samples per problem (pass@1 mean and sd when > 1)
    m_min: int = 16
    trace_temperature: float = 0.7
    max_new_tokens: int = 2048
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["verbal"])  # of the starting model
    # Share of an engine's requests (evaluation or trace sampling) that may fail before the stage
    # fails instead of being marked done; failed requests are never graded as wrong answers.
    max_error_fraction: float = 0.0


@dataclasses.dataclass
class VariantsSection:
    """Variants that give the trace a reason to carry information (docs/variants.md). The
    defaults are the paper's method."""
    bottleneck: str = "paper"  # paper (single-pass mask) | two_pass ([x; c; z] and [x; z; y], packed)
    trace_selection: str = "none"  # none | best_of_k (Phase A traces, rounds >= 2)
    k: int = 8  # best_of_k: candidates per example
    select_phase_b: bool = False  # best_of_k: select the Phase B traces too
    weight_by_score: bool = False  # best_of_k: train every candidate, weighted by softmax(scores)
    round1_traces: str = "random"  # random (the paper's rule) | cot_codes (k-means codes of the CoT steps)
    code_layer: int = -1  # cot_codes: layer of the step hidden states (-1 = middle, 0 = embeddings)
    codes_per_step: int = 1  # cot_codes: residual-quantisation levels (tokens per step)
    # cot_codes: the last abstract token after each step's codes (the codebook uses the other 63), so
    # steps sit at the same relative positions as in the verbal CoT, where a newline follows each step
    step_separator: bool = False
    # cot_codes in round 1: noise (the vocabulary's initial rows) | step_tokens (before Phase A each
    # code's rows become the mean of the rows of the CoT tokens it encodes; abscot_jax/code_rows.py)
    code_rows: str = "noise"
    trace_prior_weight: float = 0.0  # best_of_k: score = log p(y | x, z) + this * log p(z | x)
    # Phase B's traces (the M-step's targets): sampled (the paper: z ~ p_A(z | x)) | cot_codes (the
    # round's codebook applied to the Phase B split's own CoT) | posterior (z ~ p_A(z | x, c))
    phase_b_traces: str = "sampled"
    posterior_temperature: float = 1.0  # posterior: sampling temperature of z given (x, c)
    trace_source: str = "rules"  # rules (the sources above) | pause (one repeated abstract token, every phase)
    # stepwise: no Phase A; Phase B trains from the previous round's model in curriculum_stages
    # sub-phases, sub-phase s replacing the first ceil(s * n / S) of a CoT's n steps by their codes
    # (curriculum_fill=codes) or removing them (none); the last sub-phase is Phase B's [x; z; y]
    curriculum: str = "none"  # none | stepwise
    curriculum_fill: str = "codes"  # codes | none
    curriculum_stages: int = 4


@dataclasses.dataclass
class RLSection:
    """GRPO after the warm-up (abscot_jax/rl): the ledger's `rl` stage, RUN/rl/."""
    enabled: bool = False  # run the rl stage and rl_eval after the last round (`--stage rl` runs them either way)
    # abstract: constrained trace then answer, from the last round's model | verbal: the verbal-CoT
    # model (warm-up) with RL, the paper's SFT + RL baseline
    mode: str = "abstract"
    reward: str = "math_verify"  # math_verify | toy | judge (abscot_jax/rl/rewards.py)
    data: str = ""  # prompts with gold answers ("" = data.train); never the evaluation set's problems
    data_format: str = "dolci"  # dolci (Dolci-Think rows, gold = last \boxed{} of the answer) | math (problem, answer)
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 8  # K, the group each reward is normalised in
    steps: int = 100
    updates_per_step: int = 1  # optimizer steps on each step's rollouts (> 1: the clipping acts)
    learning_rate: float = 1e-6  # the optim section's schedule and AdamW settings otherwise
    clip_eps: float = 0.2
    kl_weight: float = 0.04  # per-token k3 KL to the reference (LoRA: adapters off; full: the starting weights)
    length_penalty: float = 0.0  # reward - length_penalty * generated tokens / max_new_tokens
    temperature: float = 1.0  # sampling, trace and answer
    max_new_tokens: int = 1024  # per rollout: delimiters, trace, answer and stop token
    # Longest prompt kept (0: train.seq_len - max_new_tokens); the memory plan sizes the sampler for it.
    max_prompt_tokens: int = 0
    rollout_batch: int = 64  # rollouts the sampler generates together
    checkpoint_every: int = 10
    judge_url: str = ""  # the judge's OpenAI-compatible endpoint, e.g. http://host:8000/v1/chat/completions
    judge_model: str = ""
    judge_timeout: float = 60.0  # seconds per call
    judge_retries: int = 2  # further attempts after a failed call; a rollout whose calls all fail is dropped
    judge_concurrency: int = 8  # calls in flight


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs"
    rounds: int = 3
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoRAConfig = LoRAConfig()
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshConfig = MeshConfig()
    data: DataSection = dataclasses.field(default_factory=DataSection)
    sampler: SamplerSection = dataclasses.field(default_factory=SamplerSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    variants: VariantsSection = dataclasses.field(default_factory=VariantsSection)
    rl: RLSection = dataclasses.field(default_factory=RLSection)

    def rl_prompt_limit(self) -> int:
        """The longest RL prompt kept: rl.max_prompt_tokens, within train.seq_len - rl.max_new_tokens."""
        room = self.train.seq_len - self.rl.max_new_tokens
        return min(self.rl.max_prompt_tokens, room) if self.rl.max_prompt_tokens else room

    def build_config(self) -> BuildConfig:
        """The sequence builder's settings, from the train and data sections."""
        t, d = self.train, self.data
        return BuildConfig(seq_len=t.seq_len, m_max=d.m_max, cut_policy=d.cut_policy, loss_on_trace=t.loss_on_trace,
                           system=d.system or None, seed=t.seed)

    def validate(self) -> "RunConfig":
        v = self.variants
        checks = [
            (self.train.mode in ("lora", "full"), "train.mode must be 'lora' or 'full'"),
            (self.train.seq_len >= 16, "train.seq_len must be >= 16"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.epochs >= 1 and self.train.phase_b_epochs >= 0,
             "train.epochs must be >= 1 and train.phase_b_epochs >= 0 (0: train.epochs)"),
            (self.train.loss_chunk >= 1, "train.loss_chunk must be >= 1"),
            (0 < self.train.device_memory_fraction <= 1, "train.device_memory_fraction must be in (0, 1]"),
            (self.model.remat in REMAT_POLICIES, f"model.remat must be one of {', '.join(REMAT_POLICIES)}"),
            (self.optim.learning_rate > 0, "optim.learning_rate must be > 0"),
            (0 <= self.optim.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.data.examples_per_phase >= 1, "data.examples_per_phase must be >= 1"),
            (self.sampler.engine in ("jax", "hf", "vllm"), "sampler.engine must be jax, hf or vllm"),
            (self.sampler.engine != "vllm" or bool(self.sampler.python),
             "sampler.engine=vllm needs sampler.python: the Python of an environment with vllm installed"),
            (set(self.eval.baselines) <= {"verbal", "direct"}, "eval.baselines: a list of 'verbal' and 'direct'"),
            (0 <= self.eval.max_error_fraction <= 1, "eval.max_error_fraction must be in [0, 1]"),
            (self.eval.m_min <= self.data.m_max, "eval.m_min must be <= data.m_max: an evaluation trace (and an "
             "abstract rl rollout's) has m_min to m_max abstract tokens"),
            (0 < self.sampler.gpu_memory_utilization <= 1, "sampler.gpu_memory_utilization must be in (0, 1]"),
            (self.sampler.dtype in ("auto", "bfloat16", "float16", "float32"),
             "sampler.dtype must be auto, bfloat16, float16 or float32"),
            (v.bottleneck in LAYOUTS, f"variants.bottleneck must be one of {', '.join(LAYOUTS)}"),
            (v.trace_selection in SELECTIONS, f"variants.trace_selection must be one of {', '.join(SELECTIONS)}"),
            (v.k >= 1, "variants.k must be >= 1"),
            (v.trace_selection == "best_of_k" or not (v.select_phase_b or v.weight_by_score or v.trace_prior_weight),
             "variants.select_phase_b, weight_by_score and trace_prior_weight need variants.trace_selection=best_of_k"),
            (v.trace_prior_weight >= 0, "variants.trace_prior_weight must be >= 0"),
            (v.round1_traces in ROUND1_SOURCES, f"variants.round1_traces must be one of {', '.join(ROUND1_SOURCES)}"),
            (v.code_layer >= -1, "variants.code_layer must be -1 (middle layer) or a layer number >= 0"),
            (1 <= v.codes_per_step + v.step_separator <= self.data.m_max,
             "variants.codes_per_step (+1 with step_separator) must be in [1, data.m_max]"),
            (v.code_rows in ("noise", "step_tokens"), "variants.code_rows must be 'noise' or 'step_tokens'"),
            (v.code_rows == "noise" or (v.round1_traces == "cot_codes" and v.curriculum == "none"
                                         and v.trace_source == "rules"),
             "variants.code_rows=step_tokens sets the codes' rows before round 1's Phase A from its CoT codes: "
             "it needs variants.round1_traces=cot_codes, no curriculum and trace_source=rules"),
            (v.phase_b_traces in PHASE_B_SOURCES, f"variants.phase_b_traces must be one of {', '.join(PHASE_B_SOURCES)}"),
            (not v.select_phase_b or v.phase_b_traces == "sampled",
             "variants.select_phase_b selects among sampled traces: it needs variants.phase_b_traces=sampled"),
            (v.posterior_temperature > 0, "variants.posterior_temperature must be > 0"),
            (v.trace_source in ("rules", "pause"), "variants.trace_source must be 'rules' or 'pause'"),
            (v.curriculum in ("none", "stepwise"), "variants.curriculum must be 'none' or 'stepwise'"),
            (v.curriculum_fill in ("codes", "none"), "variants.curriculum_fill must be 'codes' or 'none'"),
            (v.curriculum_stages >= 1, "variants.curriculum_stages must be >= 1"),
            (v.curriculum == "none" or (v.trace_source == "rules" and v.trace_selection == "none"),
             "variants.curriculum=stepwise replaces the CoT steps by their codes: it takes no "
             "trace_source=pause or trace_selection"),
            (v.bottleneck != "two_pass" or self.train.loss_on_trace,
             "variants.bottleneck=two_pass trains z in its trace pass: it needs train.loss_on_trace=true"),
            *self.rl_checks(),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def rl_checks(self) -> list[tuple[bool, str]]:
        r = self.rl
        return [
            (r.mode in RL_MODES, f"rl.mode must be one of {', '.join(RL_MODES)}"),
            (r.reward in REWARDS, f"rl.reward={r.reward!r} is not a reward; use one of {', '.join(REWARDS)}"),
            (r.data_format in DATA_FORMATS, f"rl.data_format must be one of {', '.join(DATA_FORMATS)}"),
            (r.rollouts_per_prompt >= 2, f"rl.rollouts_per_prompt={r.rollouts_per_prompt} gives no group: GRPO "
             "normalises each reward within the K rollouts of its prompt; set it to 2 or more"),
            (min(r.prompts_per_step, r.steps, r.updates_per_step, r.max_new_tokens, r.rollout_batch,
                 r.checkpoint_every, r.judge_concurrency) >= 1,
             "rl.prompts_per_step, steps, updates_per_step, max_new_tokens, rollout_batch, checkpoint_every and "
             "judge_concurrency must be >= 1"),
            (r.learning_rate > 0 and r.temperature > 0, "rl.learning_rate and rl.temperature must be > 0"),
            (r.max_prompt_tokens >= 0, "rl.max_prompt_tokens must be >= 0 (0: train.seq_len - rl.max_new_tokens)"),
            (0 < r.clip_eps < 1, "rl.clip_eps must be in (0, 1)"),
            (r.kl_weight >= 0 and r.length_penalty >= 0, "rl.kl_weight and rl.length_penalty must be >= 0"),
            (r.judge_timeout > 0 and r.judge_retries >= 0, "rl.judge_timeout must be > 0 and rl.judge_retries >= 0"),
            (r.reward != "judge" or bool(r.judge_url and r.judge_model),
             "rl.reward=judge needs rl.judge_url (an OpenAI-compatible .../v1/chat/completions address) and "
             "rl.judge_model"),
        ]


def _closest(key: str, valid, prefix: str = "") -> str:
    """"; did you mean 'section.key'?": the valid key nearest to `key`, named in full."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {f'{prefix}.{match[0]}' if prefix else match[0]!r}?" if match else ""


def _coerce(value, hint, where: str):
    """Check/convert a YAML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin in (list, tuple):  # list[X] or tuple[X, ...]
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return origin(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(f"unknown config key {where!r}{_closest(key, hints, prefix)}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    path, raw = item.split("=", 1)
    return path.split("."), yaml.safe_load(raw) if raw else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=RunConfig):
    """Read a YAML file (optional) and apply `a.b=value` overrides (values parsed as YAML scalars)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return _build(cls, data).validate()


def to_dict(config):
    """The config as plain YAML data (sections as dicts, tuples as lists): what load_config reads back."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config
