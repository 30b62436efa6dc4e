"""Write a random tiny Qwen3 HF checkpoint and tokenizer (offline). Example:
python scripts/make_tiny_checkpoint.py --out /tmp/tiny --layers 2 --hidden 64 --heads 4 --kv-heads 2
"""
import argparse

from abscot_jax.fixtures import make_checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="embedding rows (default: tokenizer + spare rows)")
    p.add_argument("--tokenizer-vocab", type=int, default=512)
    p.add_argument("--spare-rows", type=int, default=128)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 200KB: write sharded safetensors")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = make_checkpoint(
        a.out, vocab_size=a.vocab, tokenizer_vocab_size=a.tokenizer_vocab, spare_rows=a.spare_rows,
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
        tie_word_embeddings=not a.untied, max_shard_size=a.max_shard_size, dtype=a.dtype, seed=a.seed,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
