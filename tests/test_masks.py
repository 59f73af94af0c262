"""AttentionMask: its dense meaning against the rule written out in numpy, per-layer windows, and
pytree behaviour (jit, nn.scan broadcast) with static fields kept static."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.masks import AttentionMask, build, dense, for_layer, query_valid


def numpy_rule(seg, q_start, kv_valid, t, window):
    """The mask the models have always meant, one entry at a time."""
    b = seg.shape[0] if seg is not None else (kv_valid.shape[0] if kv_valid is not None else 1)
    s = t if kv_valid is None else kv_valid.shape[1]
    out = np.zeros((b, t, s), bool)
    for r in range(b):
        for i in range(t):
            qi = i + (q_start or 0)
            for j in range(s):
                valid = (seg[r, j] != 0) if seg is not None else (kv_valid[r, j] if kv_valid is not None else True)
                ok = valid and j <= qi
                if seg is not None:
                    ok = ok and (seg[r, i] == seg[r, j] or seg[r, i] == 0)
                if window is not None:
                    ok = ok and qi - j < window
                out[r, i, j] = ok
    return out


def test_dense_is_the_rule():
    seg = np.array([[0, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 3, 3]])
    for window in (None, 2):
        m = AttentionMask(segment_ids=jnp.asarray(seg), window=window)
        np.testing.assert_array_equal(np.asarray(dense(m, 7))[:, 0], numpy_rule(seg, None, None, 7, window))
        np.testing.assert_array_equal(np.asarray(dense(AttentionMask(window=window), 7))[0, 0],
                                      numpy_rule(None, None, None, 7, window)[0])
    kv = np.array([[0, 1, 1, 1, 0, 0, 0, 0]], bool)
    m = AttentionMask(kv_valid=jnp.asarray(kv), q_start=jnp.int32(2), window=2)
    np.testing.assert_array_equal(np.asarray(dense(m, 3))[:, 0], numpy_rule(None, 2, kv, 3, 2))
    assert query_valid(AttentionMask(), 3) is None


def test_windows_per_layer():
    mask, window = build(jnp.ones((1, 6), jnp.int32), None, None, None, 6, 3, "xla")
    assert (mask.window, window.window, window.implementation) == (None, 3, "xla")
    assert for_layer(mask, window, np.bool_(True)) is window and for_layer(mask, window, False) is mask
    assert for_layer(mask, None, True) is mask

    @jax.jit
    def per_layer(flag):  # under nn.scan the layer's flag is only known at run time
        return dense(for_layer(mask, window, flag), 6)

    np.testing.assert_array_equal(per_layer(True), dense(window, 6))
    np.testing.assert_array_equal(per_layer(False), dense(mask, 6))
    assert build(None, None, None, None, 6, 6, "auto")[1] is None  # a window >= S changes nothing


def test_mask_is_a_pytree_with_static_fields():
    m = AttentionMask(segment_ids=jnp.ones((1, 4), jnp.int32), window=2, implementation="xla")
    leaves, tree = jax.tree.flatten(m)
    assert len(leaves) == 1
    again = jax.tree.unflatten(tree, leaves)
    assert (again.window, again.implementation, again.kind) == (2, "xla", "segments")
    assert jax.jit(lambda m: m.window)(m) == 2  # static: a Python int inside jit
