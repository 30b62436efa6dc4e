"""python -m abscot_jax.eval --model DIR --data math500|PATH --mode abstract|verbal|direct --out DIR

Evaluates an exported HF model directory on MATH-500 (`math500` = the hub dataset
HuggingFaceH4/MATH-500) or a local file in its schema, and writes results.jsonl and summary.json
to --out (see abscot_jax/eval/evaluate.py for the prompts, modes and diagnostics)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from abscot_jax.eval.evaluate import HUB_ID, MODES, dataset_name, evaluate, summary_lines, write_results
from abscot_jax.hostmem import keep_freed_memory


def build_engine(name: str, model_dir: str, max_batch: int):
    from abscot_jax.sampling import engines

    if name == "jax":
        return engines.JaxEngine.from_dir(model_dir, max_batch=max_batch)
    if name == "hf":
        return engines.HFEngine(model_dir, max_batch=max_batch)
    return engines.vllm_engine(model_dir, engines.VllmOptions(max_batch=max_batch))


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # XLA's per-call temporaries: see abscot_jax/hostmem.py
    p = argparse.ArgumentParser(prog="python -m abscot_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--data", required=True, help=f"'math500' ({HUB_ID}) or a .jsonl/.json/.parquet file in its schema")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--out", required=True, help="directory for results.jsonl and summary.json")
    p.add_argument("--engine", default="jax", choices=["jax", "hf", "vllm"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (abstract mode: traces differ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--m-min", type=int, default=16, help="shortest trace (abstract mode)")
    p.add_argument("--m-max", type=int, default=128, help="longest trace (abstract mode)")
    p.add_argument("--trace-temperature", type=float, default=0.7)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--no-diagnostics", action="store_true", help="skip the random/shuffled trace runs")
    a = p.parse_args(argv)
    try:
        for name in ("limit", "samples", "max_new_tokens", "max_batch"):
            value = getattr(a, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        from abscot_jax.data.math500 import load_math500, print_summary
        from abscot_jax.sampling.engines import check_model_dir

        check_model_dir(a.model)
        problems, report = load_math500(HUB_ID if a.data == "math500" else a.data, limit=a.limit)
        print_summary(report)
        if not problems:
            raise ValueError(f"no usable problems in {a.data}")
        from transformers import AutoTokenizer

        from abscot_jax.vocab import has_abstract_tokens

        tokenizer = AutoTokenizer.from_pretrained(a.model)
        if a.mode == "abstract" and not has_abstract_tokens(tokenizer):
            raise ValueError(f"{a.model} has no abstract tokens, so it cannot write a trace: evaluate a model "
                             "trained with them, or use --mode verbal or direct")
        engine = build_engine(a.engine, a.model, a.max_batch)
        records, summary = evaluate(
            engine, tokenizer, problems, mode=a.mode, samples_per_problem=a.samples, m_min=a.m_min, m_max=a.m_max,
            trace_temperature=a.trace_temperature, max_new_tokens=a.max_new_tokens, seed=a.seed,
            diagnostics=not a.no_diagnostics, dataset=dataset_name(a.data))
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError is an OSError
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    summary["model"] = a.model
    results_path, summary_path = write_results(a.out, records, summary)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {results_path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
