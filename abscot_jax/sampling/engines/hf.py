"""HFEngine: HF transformers `generate` behind the engines' interface; a logits processor runs the
same token choice (constraint + greedy/sampling) as the JAX sampler. The CPU reference."""
from __future__ import annotations

from abscot_jax.sampling.engines.base import (
    LocalEngine, check_model_dir, end_of_turn_id, load_abstract_vocab, model_context,
)
from abscot_jax.sampling.protocol import in_length_batches


class HFEngine(LocalEngine):
    """`generate` on an HF directory. HF runs the model and its cache; at each step a logits
    processor applies the sampler's `decode_step` (the same constraint and token choice, per-row
    seeds included) and leaves only the chosen token finite, so greedy `generate` emits it; a
    stopping criterion ends each row when `decode_step` says it is done."""

    def __init__(self, model_dir, *, dtype: str = "float32", device: str = "cpu", max_batch: int = 32,
                 context: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        model_dir = check_model_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab = load_abstract_vocab(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
        # Our processor and stopping criterion decide everything: drop the checkpoint's defaults
        # (eos, temperature, ...) so generate adds no processors or stops of its own.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id)
        self.vocab_size = self.model.config.vocab_size
        self.context = context or model_context(model_dir)
        self.device, self.max_batch = device, max_batch

    def _generate(self, prompts, requests, limits):
        return in_length_batches(prompts, requests, limits, self.max_batch, self._generate_batch)

    def _generate_batch(self, prompts, requests, limits):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        chooser = _DecodeStepProcessor(requests, limits, self.vocab, end_of_turn_id(self.tokenizer), self.pad_id)
        config = GenerationConfig(do_sample=False, max_new_tokens=max(limits), pad_token_id=self.pad_id)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=config, logits_processor=LogitsProcessorList([chooser]),
                                stopping_criteria=StoppingCriteriaList([chooser.stopping]))
        return chooser.outputs()


class _DecodeStepProcessor:
    """HF LogitsProcessor running `sampler.decode_step` on HF's logits (see HFEngine)."""

    def __init__(self, requests, limits, vocab, eos_id, pad_id):
        import jax
        import jax.numpy as jnp
        from transformers import StoppingCriteria

        from abscot_jax.sampling.sampler import DecodeState, Rows, TraceTokens, decode_step

        self.trace, self.pad_id = TraceTokens.of(vocab), pad_id
        self.rows = jax.tree.map(jnp.asarray, Rows.build(requests, limits, eos_id))
        self.state = DecodeState.init(self.rows, max(limits))
        self._step = _jitted(decode_step)
        processor = self

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import numpy as np
                import torch

                return torch.from_numpy(np.asarray(processor.state.done)).to(input_ids.device)

        self.stopping = Stop()

    def __call__(self, input_ids, scores):
        import numpy as np
        import torch

        step = int(self.state.step)
        live = ~np.asarray(self.state.done)
        if step > 0:  # HF must have fed back what we chose
            fed, chosen = input_ids[:, -1].cpu().numpy(), np.asarray(self.state.tokens[:, step - 1])
            if not np.array_equal(fed[live], chosen[live]):
                raise RuntimeError("HF generate appended tokens other than the ones chosen")
        logits = scores.detach().float().cpu().numpy()
        self.state = self._step(self.state, logits, self.rows, trace=self.trace)
        token = np.asarray(self.state.tokens[:, step])
        token = torch.from_numpy(np.where(token >= 0, token, self.pad_id)).to(scores.device)
        forced = torch.full_like(scores, -float("inf"))
        forced[torch.arange(scores.shape[0], device=scores.device), token] = 0.0
        return forced

    def outputs(self) -> list[tuple[list[int], bool]]:
        import numpy as np

        tokens, stopped = np.asarray(self.state.tokens), np.asarray(self.state.stopped)
        return [([int(t) for t in row if t >= 0], bool(s)) for row, s in zip(tokens, stopped)]


_JITTED = {}


def _jitted(fn):
    import jax

    if fn not in _JITTED:
        _JITTED[fn] = jax.jit(fn, static_argnames=("trace",))
    return _JITTED[fn]
