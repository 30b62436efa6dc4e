"""Run a JSONL file of sampling requests through one engine: the worker of an out-of-process
engine (see process.py).

    python -m abscot_jax.sampling.engines --engine hf|vllm|jax --model DIR \
        --requests IN.jsonl --out OUT.jsonl

It imports jax, torch or vllm only for the engine it runs: the vLLM environment needs none of
the others.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from abscot_jax.sampling.engines import local_engine
from abscot_jax.sampling.engines.base import check_model_dir
from abscot_jax.sampling.engines.vllm import VllmOptions, run_vllm
from abscot_jax.sampling.protocol import read_requests, write_results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abscot_jax.sampling.engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, choices=["hf", "vllm", "jax"])
    p.add_argument("--model", required=True, help="exported HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--requests", required=True, help="JSONL file of SamplingRequest objects")
    p.add_argument("--out", required=True, help="JSONL file to write the results to (one per request, in order)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="longest prompt + generation (default: the model's)")
    p.add_argument("--dtype", default=None, help="hf/jax: float32 (default) or bfloat16; vllm: auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    a = p.parse_args(argv)
    try:
        check_model_dir(a.model)
        if not Path(a.requests).is_file():
            raise FileNotFoundError(f"{a.requests} not found; pass the requests JSONL file")
        requests = read_requests(a.requests)
        if a.engine == "vllm":
            options = VllmOptions(tensor_parallel_size=a.tensor_parallel_size,
                                  gpu_memory_utilization=a.gpu_memory_utilization,
                                  max_model_len=a.max_model_len or a.context, dtype=a.dtype or "auto",
                                  enforce_eager=a.enforce_eager, max_batch=a.max_batch or 256)
            results = run_vllm(requests, a.model, options)
        else:
            engine = local_engine(a.engine, a.model, max_batch=a.max_batch or 32, context=a.context,
                                  dtype=a.dtype or "float32")
            results = engine.run_requests(requests)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_results(a.out, results)
    failed = sum(r.finish_reason == "error" for r in results)
    print(f"{len(results)} results ({failed} errors) -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
