"""python -m abscot_jax.eval --model DIR [--data math500|PATH] --mode abstract|verbal|direct --out DIR [--run RUN]

Evaluates an exported HF model directory on MATH-500 (`math500` = the hub dataset
HuggingFaceH4/MATH-500) or a local file in its schema, and writes results.jsonl and summary.json
to --out (see abscot_jax/eval/evaluate.py for the prompts, modes and diagnostics).

The settings (data, limit, samples, seed, trace lengths, token budget, engine) default to the run
config's defaults; with `--run RUN` to that run's own (RUN/config.yaml), as its evaluation stages
use them, so a model of the run is evaluated as the run evaluates it. Options given override
either. An --out that already holds results is refused unless --overwrite."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from abscot_jax.config import RunConfig, load_config
from abscot_jax.errors import ConfigError
from abscot_jax.eval.evaluate import (HUB_ID, MODES, RESULTS_FILE, SUMMARY_FILE, dataset_name, evaluate,
                                      summary_lines, write_results)
from abscot_jax.hostmem import keep_freed_memory

# The settings a run config gives, and the config value each comes from.
RUN_SETTINGS = {
    "data": "data.eval", "limit": "eval.limit", "samples": "eval.samples", "seed": "train.seed",
    "max_new_tokens": "eval.max_new_tokens", "m_min": "eval.m_min", "m_max": "data.m_max",
    "trace_temperature": "eval.trace_temperature", "engine": "sampler.engine", "max_batch": "sampler.max_batch",
}


def run_settings(cfg: RunConfig) -> dict:
    """The evaluation settings `cfg` gives (as the run's evaluation stages read them)."""
    settings = {}
    for name, key in RUN_SETTINGS.items():
        section, field = key.split(".")
        settings[name] = getattr(getattr(cfg, section), field)
    settings["limit"] = settings["limit"] or None  # eval.limit 0 = every problem
    return settings


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, [], False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m abscot_jax.eval", description=" ".join(__doc__.split("\n\n")[1:]),
                                formatter_class=_Help)
    p.add_argument("--model", required=True, help="exported HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="abstract: an abstract trace, then the answer (with the random/shuffled trace diagnostics); "
                        "verbal: the model writes freely (its verbal CoT); direct: the CoT block is closed empty, "
                        "so the model answers at once")
    p.add_argument("--out", required=True, help="directory for results.jsonl and summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace the results an existing --out holds")
    p.add_argument("--run", help="a run directory: its config.yaml gives the settings below, as its evaluation used them")
    p.add_argument("--data", help=f"'math500' ({HUB_ID}) or a .jsonl/.json/.parquet file in its schema")
    p.add_argument("--limit", type=int, help="evaluate the first N problems (default: all, or the run's eval.limit)")
    p.add_argument("--samples", type=int, help="samples per problem (abstract mode: traces differ)")
    p.add_argument("--seed", type=int, help="seeds each sample's trace and the diagnostics' random traces")
    p.add_argument("--max-new-tokens", type=int, help="token budget per sample (trace and answer together)")
    p.add_argument("--m-min", type=int, help="shortest trace (abstract mode)")
    p.add_argument("--m-max", type=int, help="longest trace (abstract mode)")
    p.add_argument("--trace-temperature", type=float, help="sampling temperature of the trace (abstract mode)")
    p.add_argument("--engine", choices=["jax", "hf", "vllm"],
                   help="vllm starts with the run's sampler settings (sampler.python ...)")
    p.add_argument("--max-batch", type=int, help="requests the engine runs at once")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the random/shuffled trace runs")
    p.set_defaults(**run_settings(RunConfig()))
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The arguments, with the run's settings where --run is given and an option is not, and the
    run config the engine is built from (the run's, or the defaults)."""
    parser = build_parser()
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--run")
    run_dir = run.parse_known_args(argv)[0].run
    cfg = RunConfig()
    if run_dir:
        path = Path(run_dir) / "config.yaml"
        if not path.is_file():
            raise ConfigError(f"--run {run_dir}: no config.yaml there; pass a run directory (runs/NAME)")
        cfg = load_config(path)
        parser.set_defaults(**run_settings(cfg))
    return parser.parse_args(argv), cfg


def describe(a: argparse.Namespace) -> str:
    """The settings line: what this evaluation uses, and where they come from."""
    source = f"{Path(a.run) / 'config.yaml'}, unless given" if a.run else "defaults, unless given"
    return (f"settings ({source}): data {a.data}, limit {a.limit or 'all'}, samples {a.samples}, "
            f"seed {a.seed}, max_new_tokens {a.max_new_tokens}, m_min {a.m_min}, m_max {a.m_max}, "
            f"trace_temperature {a.trace_temperature:g}, engine {a.engine}, max_batch {a.max_batch}")


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory")
    held = [name for name in (RESULTS_FILE, SUMMARY_FILE) if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out} already holds {' and '.join(held)}; pass --overwrite to replace them, "
                         "or another --out")


def main(argv: Sequence[str] | None = None) -> int:
    from abscot_jax.errors import run_cli  # Ctrl-C: one line, exit 130

    return run_cli(run, argv, interrupt_line=True)


def run(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # XLA's per-call temporaries: see abscot_jax/hostmem.py
    try:
        a, cfg = parse_args(argv)
        check_out(Path(a.out), a.overwrite)
        for name in ("limit", "samples", "max_new_tokens", "max_batch"):
            value = getattr(a, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        print(describe(a), flush=True)
        from abscot_jax.data.math500 import load_math500, print_summary
        from abscot_jax.sampling.engines.base import check_model_dir

        check_model_dir(a.model)
        problems, report = load_math500(HUB_ID if a.data == "math500" else a.data, limit=a.limit)
        print_summary(report)
        if not problems:
            raise ValueError(f"no usable problems in {a.data}")
        from transformers import AutoTokenizer

        from abscot_jax.sampling.engines import make_engine
        from abscot_jax.vocab import has_abstract_tokens

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        if a.mode == "abstract" and not has_abstract_tokens(tokenizer):
            raise ValueError(f"{a.model} has no abstract tokens, so it cannot write a trace: evaluate a model "
                             "trained with them, or use --mode verbal or direct")
        # The engine as the run's stages build it, with this command's engine and batch size.
        cfg.sampler = dataclasses.replace(cfg.sampler, engine=a.engine, max_batch=a.max_batch)
        engine = make_engine(Path(a.model), cfg.sampler)
        records, summary = evaluate(
            engine, tokenizer, problems, mode=a.mode, samples_per_problem=a.samples, m_min=a.m_min, m_max=a.m_max,
            trace_temperature=a.trace_temperature, max_new_tokens=a.max_new_tokens, seed=a.seed,
            diagnostics=not a.no_diagnostics, dataset=dataset_name(a.data))
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError is an OSError; ConfigError a ValueError
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    summary["model"] = a.model
    if a.run:
        summary["run"] = a.run
    results_path, summary_path = write_results(a.out, records, summary)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {results_path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
