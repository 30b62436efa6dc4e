"""JaxEngine: the JAX sampler behind the engines' interface, in process (it shares the model with
training code)."""
from __future__ import annotations

from abscot_jax.sampling.engines.base import LocalEngine, check_model_dir, end_of_turn_id, load_abstract_vocab


class JaxEngine(LocalEngine):
    """The JAX sampler behind the common interface. `model`: a Qwen3 NNX model; `sampler_options`
    go to `Sampler` (max_batch, min_batch, min_prompt_bucket, min_new_bucket)."""

    def __init__(self, model, tokenizer, *, mesh=None, context: int | None = None, **sampler_options):
        from abscot_jax.sampling.sampler import Sampler, TraceTokens

        self.tokenizer = tokenizer
        self.vocab = load_abstract_vocab(tokenizer)
        self.vocab_size = model.config.vocab_size
        self.context = context or model.config.max_position_embeddings
        self.sampler = Sampler(model, trace=TraceTokens.of(self.vocab), eos_id=end_of_turn_id(tokenizer),
                               mesh=mesh, **sampler_options)

    @classmethod
    def from_dir(cls, model_dir, *, param_dtype: str = "float32", **kwargs) -> "JaxEngine":
        from transformers import AutoTokenizer

        from abscot_jax.checkpoint.hf import load_hf

        model_dir = check_model_dir(model_dir)
        return cls(load_hf(model_dir, param_dtype=param_dtype), AutoTokenizer.from_pretrained(str(model_dir)), **kwargs)

    def _generate(self, prompts, requests, limits):
        return self.sampler.generate(prompts, requests, limits)
