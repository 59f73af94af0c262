"""Training machinery: the compiled sharded train/eval steps, the loss, checkpoints.

See `lora_jax.training.step` for the full example loop.
"""

from lora_jax.training.checkpoint import Checkpointer, abstract_state
from lora_jax.training.loss import IGNORE_INDEX, masked_ce, masked_ce_sum, targets_and_mask, token_losses
from lora_jax.training.step import (
    TrainStep,
    default_model_inputs,
    default_optimizer,
    init_train_state,
    make_eval_step,
    make_train_step,
    state_specs,
)

__all__ = [
    "Checkpointer", "IGNORE_INDEX", "TrainStep", "abstract_state", "default_model_inputs", "default_optimizer", "init_train_state",
    "make_eval_step", "make_train_step", "masked_ce", "masked_ce_sum", "state_specs", "targets_and_mask",
    "token_losses",
]
