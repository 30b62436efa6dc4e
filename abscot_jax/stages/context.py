"""What every stage reads: the run's configuration, its directory and the data and models in it."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jax

from abscot_jax.config import RunConfig
from abscot_jax.data.dolci import load_dolci
from abscot_jax.data.sequences import SequenceBuilder
from abscot_jax.errors import RunError
from abscot_jax.files import replace_json
from abscot_jax.sampling.engines import make_engine
from abscot_jax.sharding import sync_processes

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, data) -> None:
    """Every process calls it with the same data; process 0 writes, the others wait until it has."""
    if jax.process_index() == 0:
        replace_json(path, data)
    sync_processes(f"write {path}")


class RunContext:
    """One run directory as the stages see it; data and tokenizer are read once, when first asked for."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir) / cfg.name
        self._tokenizer = None
        self._examples = None

    def round_dir(self, t: int) -> Path:
        return self.dir / f"round_{t}"

    def start_model(self) -> Path:
        return self.dir / ("warmup/model" if self.cfg.data.warmup_examples else "base")

    def final_model(self, t: int) -> Path:
        """Round t's final model (round 0: the starting model)."""
        return self.round_dir(t) / "model_b" if t > 0 else self.start_model()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # slow to import: only the stages that read text

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.dir / "base"))
        return self._tokenizer

    def examples(self) -> dict:
        if self._examples is None:
            d = self.cfg.data
            examples, _ = load_dolci(d.train, limit=d.max_rows or None)
            self._examples = {e.id: e for e in examples}
        return self._examples

    def split(self, name: str) -> list:
        """The examples of one subset ('warmup', 'round_T_a', 'round_T_b'); fixed in splits.json."""
        path = self.dir / "splits.json"
        if not path.exists():
            write_json_atomic(path, self._make_splits())
        ids = json.loads(path.read_text())[name]
        examples = self.examples()
        return [examples[i] for i in ids]

    def _make_splits(self) -> dict:
        d = self.cfg.data
        ids = sorted(self.examples())
        random.Random(self.cfg.train.seed).shuffle(ids)
        names = [f"round_{t}_{p}" for t in range(1, self.cfg.rounds + 1) for p in "ab"]
        need = d.warmup_examples + len(names) * d.examples_per_phase
        if len(ids) < need:
            per_phase = (len(ids) - d.warmup_examples) // len(names)
            if per_phase < 1:
                raise RunError(f"{len(ids)} usable training examples cannot fill {len(names)} disjoint subsets "
                               f"(+{d.warmup_examples} warm-up); add data or lower data.examples_per_phase")
            log.warning("only %d examples: %d per phase instead of %d", len(ids), per_phase, d.examples_per_phase)
        else:
            per_phase = d.examples_per_phase
        splits = {"warmup": ids[:d.warmup_examples]}
        start = d.warmup_examples
        for name in names:
            splits[name] = ids[start:start + per_phase]
            start += per_phase
        return splits

    def builder(self):
        return SequenceBuilder(self.tokenizer, self.cfg.build_config())

    def engine(self, model_dir: Path):
        return make_engine(model_dir, self.cfg.sampler)

    def check_engine_errors(self, what: str, errors: list, total: int) -> None:
        """Fail the stage (it is not marked done) when more than eval.max_error_fraction of its
        `total` requests came back as errors (an engine that could not start fails them all)."""
        allowed = self.cfg.eval.max_error_fraction
        if total and len(errors) > allowed * total:
            raise RunError(f"{what}: {len(errors)} of {total} requests failed in the {self.cfg.sampler.engine} engine "
                           f"({str(errors[0])[:400]}); above eval.max_error_fraction={allowed:g}, so the stage is "
                           "not marked done: fix the engine or its settings and rerun")
