"""Parameter counts and PEFT's print_trainable_parameters line."""

import jax
import jax.numpy as jnp

import lora_jax


def test_dxd_kernel_has_2dr_trainable_parameters(capsys):
    d, r = 64, 4
    params = {"q_proj": {"kernel": jnp.zeros((d, d)), "bias": jnp.zeros((d,))}}
    params = lora_jax.inject(params, lora_jax.LoraConfig(r=r, target_modules=["q_proj"]), jax.random.key(0))
    assert lora_jax.count_parameters(params) == (2 * d * r, d * d + d + 2 * d * r)
    lora_jax.print_trainable_parameters(params)
    total = d * d + d + 2 * d * r
    expected = f"trainable params: {2 * d * r:,d} || all params: {total:,d} || trainable%: {100 * 2 * d * r / total:.4f}"
    assert capsys.readouterr().out.strip() == expected
