"""Sampling engines that all speak `run_requests(requests) -> results` (see protocol.py):

  jax.py      JaxEngine, the JAX sampler in process (shares the model with training code).
  hf.py       HFEngine, HF transformers `generate`; a logits processor runs the same token choice
              (constraint + greedy/sampling) as the JAX sampler. The CPU reference.
  vllm.py     run_vllm, vLLM in the process of a vLLM environment; `vllm_engine(...)` starts it
              there (a SubprocessEngine with the Python named in VllmOptions).
  process.py  SubprocessEngine: any of them in another process through JSONL files, with this
              package's command line (__main__.py) as the worker.
  base.py     what they share: request checks, batching, results.

`make_engine` builds the engine a run's config names; `local_engine` an in-process one. Only the
engines import jax, torch or vllm, and only when used: the vLLM environment needs none of the
others to run the command line.
"""
from __future__ import annotations

from abscot_jax.sampling.engines.hf import HFEngine
from abscot_jax.sampling.engines.jax import JaxEngine
from abscot_jax.sampling.engines.vllm import VllmOptions, vllm_engine


def local_engine(name: str, model_dir, *, max_batch: int = 32, context: int | None = None,
                 dtype: str = "float32") -> JaxEngine | HFEngine:
    """The in-process engine `name` (jax | hf) on an exported HF directory; `dtype`: its weights'."""
    if name == "jax":
        return JaxEngine.from_dir(model_dir, param_dtype=dtype, max_batch=max_batch, context=context)
    return HFEngine(model_dir, dtype=dtype, max_batch=max_batch, context=context)


def make_engine(model_dir, sampler):
    """The engine a run's `sampler` config section (abscot_jax.config.SamplerSection) names, on an
    exported HF directory. The section is passed in, not imported: the vLLM environment loads this
    package without the run configuration's dependencies."""
    if sampler.engine == "vllm":
        return vllm_engine(model_dir, VllmOptions(
            python=sampler.python, tensor_parallel_size=sampler.tensor_parallel_size,
            data_parallel_size=sampler.data_parallel_size, max_batch=sampler.max_batch,
            gpu_memory_utilization=sampler.gpu_memory_utilization, dtype=sampler.dtype))
    return local_engine(sampler.engine, model_dir, max_batch=sampler.max_batch)
