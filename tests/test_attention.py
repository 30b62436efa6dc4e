import numpy as np
import jax
import jax.numpy as jnp

from abscot_jax.data.roles import Role
from abscot_jax.model.attention import masked_attention, reference_mask

P, C, Z, A = Role.PROMPT, Role.COT, Role.ABSTRACT, Role.ANSWER


def test_reference_mask_hand_computed():
    # One packed row: segment 1 = [x c z y], segment 2 = [x y], one pad.
    seg = np.array([[1, 1, 1, 1, 2, 2, 0]])
    roles = np.array([[P, C, Z, A, P, A, P]])
    got = np.asarray(reference_mask(jnp.asarray(seg), jnp.asarray(roles)))[0].astype(int)
    want = np.array([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0],  # the answer sees x and z, never c
        [0, 0, 0, 0, 1, 0, 0],  # nothing crosses segments
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],  # padding sees nothing
    ])
    np.testing.assert_array_equal(got, want)


def _naive_attention(q, k, v, mask):
    """Loop-per-head NumPy reference with explicit GQA head sharing (float64)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // kv)
            s = q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d)
            s = np.where(mask[bi], s, -np.inf)
            for ti in range(t):
                if mask[bi, ti].any():
                    p = np.exp(s[ti] - s[ti].max())
                    out[bi, ti, hi] = (p / p.sum()) @ v[bi, :, kh]
    return out


def test_masked_attention_matches_naive_gqa():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 9, 6, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    seg = np.array([[1] * 5 + [2] * 3 + [0], [1] * 9])
    roles = rng.integers(0, 4, size=(b, t))
    mask = np.asarray(reference_mask(jnp.asarray(seg), jnp.asarray(roles)))
    got = np.asarray(jax.jit(masked_attention)(q, k, v, mask))
    want = _naive_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask)
    valid_rows = mask.any(-1)
    np.testing.assert_allclose(got[valid_rows], want[valid_rows], atol=1e-5)
    assert np.isfinite(got).all()  # fully masked pad rows stay finite
