"""Data pipeline throughput: raw Dolci-shaped rows -> parsed -> Phase A sequences -> packed batches.

    python scripts/bench_data.py [--rows 20000] [--seq-len 4096] [--batch-size 8] [--compare-packers]

Rows are synthetic (seeded), shaped like Dolci-Think: a user question, a multi-line CoT in a think
block (lognormal number of steps), an answer. The tokenizer is the offline fixture tokenizer
(a 512-token byte-level BPE with Qwen3's special tokens and template), which cuts text into more
tokens than Qwen3's 151k vocabulary would, so tokens/s here is pessimistic per character.
Wall-clock figures depend on the machine's load; the CPU-time figure much less.
Last line: `examples_per_s=<float> packing_efficiency=<float>`.
"""
from __future__ import annotations

import argparse
import os
import time

# The pipeline runs on the host; on a machine with a GPU, JAX would otherwise reserve most of its
# memory for nothing. JAX_PLATFORMS set by the caller wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

WORDS = ("the sum of first then we add so total is value step check number equals multiply divide "
         "therefore let compute remainder prime square root fraction answer result").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def sentence(lo, hi):
        k = int(rng.integers(lo, hi))
        return " ".join(str(rng.integers(0, 100)) if rng.random() < 0.2 else WORDS[rng.integers(len(WORDS))] for _ in range(k))

    rows = []
    for i in range(n):
        steps = max(1, int(rng.lognormal(np.log(12), 0.8)))
        cot = "\n\n".join(sentence(5, 40) for _ in range(steps))
        rows.append({
            "id": f"bench-{i}", "dataset_source": "synthetic",
            "messages": [{"role": "user", "content": sentence(10, 80) + "?"},
                         {"role": "assistant", "content": f"<think>\n{cot}\n</think>\n\n{sentence(3, 60)}"}],
        })
    return rows


def compare_packers(seq_len: int, n: int = 4000, seed: int = 0) -> None:
    """Packing efficiency and speed of grain's packers vs ours on one long-tailed length mix."""
    import grain
    from grain.experimental import BestFitPackIterDataset, FirstFitPackIterDataset

    from abscot_jax.data.pipeline import PackIterDataset
    from abscot_jax.data.roles import Role
    from abscot_jax.data.sequences import make_example

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(1500 * seq_len / 4096), 0.7, n).astype(int), 8, seq_len)
    print(f"packers: {n} examples, lognormal lengths, mean {lengths.mean() / seq_len:.2f} of seq_len {seq_len}")
    examples = [make_example([(np.ones(k, np.int32), Role.ANSWER)], example_id=str(i), phase="A")
                for i, k in enumerate(lengths)]
    source = grain.MapDataset.source(examples)
    fields = ("tokens", "roles", "targets", "loss_mask")
    unthreaded = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # as in make_dataset
    as_dict = source.map(lambda e: {k: getattr(e, k) for k in fields}).to_iter_dataset(unthreaded)

    def run(name, ds, segment_key):
        start, real, slots = time.perf_counter(), 0, 0
        for batch in ds:
            real += int(np.count_nonzero(batch[segment_key]))
            slots += batch[segment_key].size
        print(f"  {name}: packing_efficiency={real / slots:.3f} {n / (time.perf_counter() - start):.0f} examples/s")

    for cls in (FirstFitPackIterDataset, BestFitPackIterDataset):
        for bins in (8, 32, 128):
            ds = cls(as_dict, length_struct={k: seq_len for k in fields}, num_packing_bins=bins, seed=seed)
            run(f"grain {cls.__name__} bins={bins}", ds.batch(8), "tokens_segment_ids")
    for window in (64, 256, 1024):
        ds = PackIterDataset(source.to_iter_dataset(unthreaded), seq_len=seq_len, window=window, seed=seed)
        run(f"ours first-fit decreasing window={window}", ds.batch(8), "segment_ids")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--compare-packers", action="store_true",
                        help="also compare grain's packers with ours on a synthetic length mix")
    args = parser.parse_args(argv)

    from abscot_jax.data.dolci import format_counts, parse_rows
    from abscot_jax.data.pipeline import make_dataset
    from abscot_jax.data.sequences import BuildConfig, SequenceBuilder
    from abscot_jax.fixtures import make_tokenizer
    from abscot_jax.vocab import add_abstract_tokens

    if args.compare_packers:
        compare_packers(args.seq_len)
    tokenizer = make_tokenizer()
    add_abstract_tokens(tokenizer)
    rows = synthetic_rows(args.rows)

    c0, t0 = time.process_time(), time.perf_counter()
    examples, skipped = parse_rows(rows)
    t1 = time.perf_counter()
    builder = SequenceBuilder(tokenizer, BuildConfig(seq_len=args.seq_len))
    sequences = builder.build_all(examples, phase="A")
    t2 = time.perf_counter()
    ds = make_dataset(sequences, batch_size=args.batch_size, seq_len=args.seq_len, window=args.window,
                      num_epochs=1, shard_index=0, shard_count=1)
    batches = real = 0
    for batch in ds:
        batches += 1
        real += int(np.count_nonzero(batch["segment_ids"]))
    t3, c3 = time.perf_counter(), time.process_time()

    total = t3 - t0
    slots = batches * args.batch_size * args.seq_len
    efficiency = real / slots
    print(format_counts("rows", len(examples), skipped))
    print(f"build: {builder.report}")
    print(f"mean sequence length {np.mean([len(s) for s in sequences]):.0f} tokens; "
          f"{batches} batches of [{args.batch_size}, {args.seq_len}]")
    print(f"time: parse {t1 - t0:.2f}s, build {t2 - t1:.2f}s, pack+batch {t3 - t2:.2f}s, total {total:.2f}s; "
          f"pack+batch alone {len(sequences) / (t3 - t2):.0f} examples/s")
    print(f"tokens/s (real tokens in batches): {real / total:.0f}")
    # CPU time barely depends on what else runs on the machine; wall time does.
    print(f"cpu time {c3 - c0:.2f}s: {args.rows / (c3 - c0):.1f} examples per CPU-second")
    print(f"examples_per_s={args.rows / total:.1f} packing_efficiency={efficiency:.4f}")


if __name__ == "__main__":
    main()
