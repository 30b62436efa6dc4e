"""Sampling: the JAX sampler (sampler.py), the trace constraint (constraints.py), the request/result
protocol (protocol.py) and the engines behind one `run_requests` interface (engines/).

This package's top level imports neither jax nor torch (the vLLM environment imports it)."""
from abscot_jax.sampling.protocol import (  # noqa: F401
    MODES, RequestError, SamplingRequest, SamplingResult, read_requests, read_results, write_requests, write_results,
)
