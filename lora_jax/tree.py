"""The tree toolkit: paths, get/set and filtering of nested-dict param trees, and the leaf kinds.

A param tree is nested dicts of arrays; a leaf's *path* is the tuple of its keys as strings. The
last key says what kind of leaf it is — the one vocabulary every module uses:

    kernel                     a frozen weight [*stack, in, out]
    lora_a, lora_b             the adapter (trainable): A [*stack, in, r], B [*stack, r, out]
    lora_scale                 the adapter's scale (fp32 [*stack]): alpha/r or alpha/sqrt(r) per
                               module and layer; part of the adapter, never trained
    lora_magnitude             DoRA's magnitude vector m [*stack, out] (trained; PEFT's
                               lora_magnitude_vector), present only with use_dora
    lora_rank                  (only in stacks whose layers differ in rank, or skip layers) each
                               layer's true rank (int32 [*stack]); A/B are padded to the largest,
                               the slots past a layer's rank stay zero and are never trained

`ADAPTER_LEAVES` go with the adapter (`lora_jax.split` puts them in the LoRA half, so a swapped-in
adapter brings its own scale); `CONSTANT_LEAVES` are the adapter leaves no optimizer updates.

>>> tree = {"q": {"kernel": 1.0, "lora_a": 2.0, "lora_scale": 0.5}}
>>> filter_tree(tree, lambda path: is_adapter_leaf(path))
{'q': {'lora_a': 2.0, 'lora_scale': 0.5}}
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax

KERNEL = "kernel"
LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_SCALE = "lora_scale"
LORA_MAGNITUDE = "lora_magnitude"
LORA_RANK = "lora_rank"
LORA_LEAVES = (LORA_A, LORA_B)  # the low-rank factors
VARIANT_LEAVES = (LORA_MAGNITUDE,)  # trained leaves of LoRA variants (DoRA)
CONSTANT_LEAVES = (LORA_SCALE, LORA_RANK)  # adapter leaves that are never trained
ADAPTER_LEAVES = LORA_LEAVES + VARIANT_LEAVES + CONSTANT_LEAVES

Path = tuple[str, ...]


def path_key(path: tuple) -> Path:
    """A jax tree path as a tuple of strings: (DictKey('a'), DictKey('b')) -> ('a', 'b').

    >>> path_key(jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0][0][0])
    ('a', 'b')
    """
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def is_param_leaf(x: Any) -> bool:
    """Whether `x` is a pytree node that stands for one param (a `lora_jax.quant.QuantizedKernel`).

    >>> is_param_leaf(1.0)
    False
    """
    return getattr(type(x), "is_param_leaf", False) is True


def iter_leaves(tree: Any) -> Iterator[tuple[Path, Any]]:
    """(string path, leaf) for every leaf of a nested-dict tree, in tree order; a quantized kernel
    is one leaf at its kernel's path.

    >>> list(iter_leaves({"a": {"b": 1}, "c": 2}))
    [(('a', 'b'), 1), (('c',), 2)]
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_param_leaf)[0]:
        yield path_key(path), leaf


def get(tree: Mapping, path: Path) -> Any:
    """The subtree or leaf at `path` (KeyError if absent).

    >>> get({"a": {"b": 1}}, ("a", "b"))
    1
    """
    for k in path:
        tree = tree[k]
    return tree


def put(tree: dict, path: Path, value: Any) -> None:
    """Set `tree[path] = value` in place, creating intermediate dicts.

    >>> t = {}; put(t, ("a", "b"), 1); t
    {'a': {'b': 1}}
    """
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def has_path(tree: Any, path: Path) -> bool:
    """Whether `path` exists in the nested dicts.

    >>> has_path({"a": {"b": 1}}, ("a", "b")), has_path({"a": {"b": 1}}, ("a", "c"))
    (True, False)
    """
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return False
        tree = tree[k]
    return True


def copy_tree(tree: Any) -> Any:
    """A new dict structure over the same leaves (FrozenDicts become dicts).

    >>> t = {"a": {"b": 1}}; c = copy_tree(t); c["a"]["b"] = 2; t["a"]["b"]
    1
    """
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def filter_tree(tree: Any, keep: Callable[[Path], bool], _prefix: Path = ()) -> dict:
    """The nested dict of the entries whose path satisfies `keep` (empty branches dropped).

    Walks the dicts themselves, so any value that is not a mapping counts as one entry: it works
    on trees of arrays, of shapes and of `PartitionSpec`s alike.

    >>> filter_tree({"a": {"kernel": 1, "lora_a": 2}}, lambda p: p[-1] == "kernel")
    {'a': {'kernel': 1}}
    """
    out: dict = {}
    for k, v in tree.items():
        path = _prefix + (str(k),)
        if isinstance(v, Mapping):
            sub = filter_tree(v, keep, path)
            if sub:
                out[k] = sub
        elif keep(path):
            out[k] = v
    return out


def map_paths(fn: Callable[[Path, Any], Any], tree: Any) -> dict:
    """A tree of `fn(path, leaf)` with the same structure.

    >>> map_paths(lambda p, x: p[-1], {"a": {"kernel": 1}})
    {'a': {'kernel': 'kernel'}}
    """
    out: dict = {}
    for path, leaf in iter_leaves(tree):
        put(out, path, fn(path, leaf))
    return out


def is_adapter_leaf(path: Path) -> bool:
    """Whether a leaf belongs to an adapter (A, B or its scale).

    >>> is_adapter_leaf(("q", "lora_scale")), is_adapter_leaf(("q", "kernel"))
    (True, False)
    """
    return path[-1] in ADAPTER_LEAVES


def is_constant_leaf(path: Path) -> bool:
    """Whether a leaf is an adapter leaf no optimizer may update (the scale).

    >>> is_constant_leaf(("q", "lora_scale")), is_constant_leaf(("q", "lora_a"))
    (True, False)
    """
    return path[-1] in CONSTANT_LEAVES
