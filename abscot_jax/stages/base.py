"""prepare_base: the starting model with the abstract vocabulary added, as RUN/base (HF)."""
from __future__ import annotations

import jax
from transformers import AutoTokenizer

from abscot_jax.checkpoint import load_hf, save_hf
from abscot_jax.errors import RunError
from abscot_jax.sharding import sync_processes
from abscot_jax.stages.context import RunContext
from abscot_jax.vocab import prepare_model_vocab


def prepare_base(ctx: RunContext) -> dict:
    m = ctx.cfg.model
    if not m.hf_dir:
        raise RunError("model.hf_dir is not set: give the starting model's HF directory")
    model = load_hf(m.hf_dir, param_dtype=m.param_dtype)
    tokenizer = AutoTokenizer.from_pretrained(m.hf_dir)
    vocab, initialised = (prepare_model_vocab(model, tokenizer, sigma=m.new_row_sigma, seed=ctx.cfg.train.seed)
                          if m.add_abstract_vocab else (None, False))
    if jax.process_index() == 0:  # every process loaded the same model; one writes it
        # In the training dtype: a bf16 base (LoRA) is exported in bf16, not as a 16 GB fp32 copy of 4B.
        save_hf(model, ctx.dir / "base", tokenizer=tokenizer, dtype=m.param_dtype, overwrite=True)
    sync_processes("write base")
    return {"abstract_rows_initialised": initialised, "vocab_size": model.config.vocab_size}
