"""Next-token selection: greedy, or sampling after transformers' logits warpers.

The order and the rules are those of `transformers.generate`:

    RepetitionPenaltyLogitsProcessor  (greedy too) scores of tokens already in the sequence
                              (prompt without its left padding, then every new token):
                              s < 0 ? s * p : s / p
    TemperatureLogitsWarper   scores / temperature
    TopKLogitsWarper          drop tokens whose score is below the k-th largest (ties at the k-th kept)
    TopPLogitsWarper          sort ascending, drop the prefix whose cumulative probability is
                              <= 1 - top_p, always keep the most likely token
    multinomial sampling      from softmax(scores)  (here: `jax.random.categorical`)

`temperature == 0` means greedy (argmax, first index on ties — as torch's argmax); top_k / top_p
with it are refused, not ignored. When sampling, `top_k` None means transformers' default 50 and
0 turns top-k off; `top_p` None or 1.0 and `repetition_penalty` None or 1.0 disable those steps,
as in transformers. (The sampling values of a checkpoint's generation_config.json are not read:
pass them.) The warpers are written with the thresholds as traced values (`SamplingParams.values`),
so changing temperature / k / p does not recompile; only which warpers are active is static
(`SamplingParams.mode`). Top-p keeps every token tied with the smallest kept score (transformers
breaks such exact ties by sort order).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


DEFAULT_TOP_K = 50  # transformers' GenerationConfig default when sampling (top_k=0 turns it off)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings.

    >>> SamplingParams.make(temperature=0.7, top_k=50, top_p=None).mode
    (True, True, False, False)
    >>> SamplingParams.make(repetition_penalty=1.1).mode      # greedy with a repetition penalty
    (False, False, False, True)
    >>> SamplingParams.make(temperature=0.7).top_k, SamplingParams.make(temperature=0.7, top_k=0).top_k
    (50, None)
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None) -> "SamplingParams":
        if temperature is None or not float(temperature) >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if repetition_penalty is not None and not float(repetition_penalty) > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = none), got {repetition_penalty!r}")
        if float(temperature) == 0.0 and (top_k or (top_p is not None and float(top_p) != 1.0)):
            raise ValueError(f"top_k={top_k!r} / top_p={top_p!r} only apply when sampling; pass a temperature > 0 "
                             "(e.g. temperature=1.0) or drop them for greedy decoding")
        rep = None if repetition_penalty is None or float(repetition_penalty) == 1.0 else float(repetition_penalty)
        if top_k is None and float(temperature) > 0.0:
            top_k = DEFAULT_TOP_K  # transformers' generate samples with top_k=50 unless told otherwise
        return cls(float(temperature), top_k or None, None if top_p is None or float(top_p) == 1.0 else float(top_p), rep)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0.0

    @property
    def mode(self) -> tuple[bool, bool, bool, bool]:
        """(sample, top-k on, top-p on, repetition penalty on): the static part (one compilation per mode)."""
        return (self.do_sample, self.do_sample and self.top_k is not None, self.do_sample and self.top_p is not None,
                self.repetition_penalty is not None)

    def values(self) -> dict[str, jax.Array]:
        """The traced part: temperature, k, p, penalty as arrays (dummies where inactive)."""
        return {
            "temperature": jnp.asarray(self.temperature if self.do_sample else 1.0, jnp.float32),
            "top_k": jnp.asarray(self.top_k or 1, jnp.int32),
            "top_p": jnp.asarray(self.top_p if self.top_p is not None else 1.0, jnp.float32),
            "repetition_penalty": jnp.asarray(self.repetition_penalty or 1.0, jnp.float32),
        }


def top_k_filter(scores: jax.Array, k: jax.Array) -> jax.Array:
    """transformers' TopKLogitsWarper: -inf below the k-th largest score of each row (k traced).

    >>> top_k_filter(jnp.array([[1.0, 3.0, 2.0]]), jnp.asarray(2)).tolist()
    [[-inf, 3.0, 2.0]]
    """
    v = scores.shape[-1]
    k = jnp.clip(k, 1, v)
    kth = jnp.take(jnp.sort(scores, axis=-1), v - k, axis=-1)[..., None]
    return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: jax.Array, p: jax.Array) -> jax.Array:
    """transformers' TopPLogitsWarper: keep the most likely tokens covering probability mass top_p.

    >>> top_p_filter(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), jnp.asarray(0.6)).tolist()[0][2]
    -inf
    """
    v = scores.shape[-1]
    s = jnp.sort(scores, axis=-1)  # ascending
    cum = jnp.cumsum(jax.nn.softmax(s, axis=-1), axis=-1)
    n_removed = jnp.minimum(jnp.sum(cum <= 1.0 - p, axis=-1), v - 1)  # a prefix; keep >= 1 token
    threshold = jnp.take_along_axis(s, n_removed[..., None], axis=-1)
    return jnp.where(scores < threshold, -jnp.inf, scores)


def repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor; `seen` [B, V] marks tokens already in the sequence.

    >>> repetition_penalty(jnp.array([[2.0, -2.0, 2.0]]), jnp.array([[True, True, False]]), 2.0).tolist()
    [[1.0, -4.0, 2.0]]
    """
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def mark_seen(seen: jax.Array, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Set `seen[b, tokens[b, ...]]` (tokens [B] or [B, T]) where `mask` is nonzero (padding skipped).

    >>> mark_seen(jnp.zeros((1, 4), bool), jnp.array([[0, 1, 3]]), jnp.array([[0, 1, 1]])).tolist()
    [[False, True, False, True]]
    """
    tokens = tokens.reshape(tokens.shape[0], -1)
    if mask is not None:
        tokens = jnp.where(mask.reshape(tokens.shape) != 0, tokens, seen.shape[-1])  # out of range: dropped
    return seen.at[jnp.arange(seen.shape[0])[:, None], tokens].set(True, mode="drop")


def select_next(logits: jax.Array, key: jax.Array, mode: tuple[bool, ...], values: dict, seen: jax.Array | None = None) -> jax.Array:
    """Next token ids [B] from last-position logits [B, V] (float32 math); `seen` for the penalty.

    >>> select_next(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), (False, False, False, False), {}).tolist()
    [1]
    """
    do_sample, use_top_k, use_top_p, use_rep = mode
    scores = logits.astype(jnp.float32)
    if use_rep:
        scores = repetition_penalty(scores, seen, values["repetition_penalty"])
    if not do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    scores = scores / values["temperature"]
    if use_top_k:
        scores = top_k_filter(scores, values["top_k"])
    if use_top_p:
        scores = top_p_filter(scores, values["top_p"])
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
