"""Quickstart: LoRA on a small Flax linen model in a few seconds on CPU.

    python examples/quickstart.py

Injects adapters into a plain linen MLP (nothing in it knows about LoRA), trains only them with
the gradients-wrt-LoRA path, merges them into the kernels and prints PEFT's summary line.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.gelu(nn.Dense(128, name="up_proj")(x))
        return nn.Dense(16, name="down_proj")(x)


def main(steps: int = 200) -> dict:
    model = MLP()
    kx, ky, kp, kl = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (256, 16))
    y = jnp.sin(x) @ jax.random.normal(ky, (16, 16))  # a target the frozen base model cannot fit
    params = model.init(kp, x)["params"]

    config = lora_jax.LoraConfig(r=8, alpha=16, target_modules=["up_proj", "down_proj"])
    params = lora_jax.inject(params, config, kl)
    lora_jax.print_trainable_parameters(params)

    apply = lora_jax.apply(model.apply, config)  # plain nn.Dense: intercepted to add x·A·B·scale
    loss_fn = lambda p: jnp.mean((apply({"params": p}, x) - y) ** 2)  # noqa: E731
    lora, frozen = lora_jax.split(params)
    tx = optax.adam(3e-3)
    opt_state = tx.init(lora)

    @jax.jit
    def step(lora, opt_state):
        loss, grads = lora_jax.lora_value_and_grad(loss_fn)(lora, frozen)  # no frozen gradients
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    first = float(loss_fn(params))
    for _ in range(steps):
        lora, opt_state, loss = step(lora, opt_state)
    trained = lora_jax.combine(lora, frozen)
    merged = lora_jax.merge(trained, config)  # zero inference overhead: a plain param tree again
    gap = float(jnp.abs(model.apply({"params": merged}, x) - apply({"params": trained}, x)).max())
    last = float(loss_fn(trained))
    print(f"loss {first:.4f} -> {last:.4f}; merged vs unmerged max |diff| {gap:.2e}")
    lora_jax.print_trainable_parameters(merged)
    return {"first_loss": first, "last_loss": last, "merge_gap": gap}


if __name__ == "__main__":
    main()
