"""Divergence: stop a run whose loss or gradients say it is destroying the adapter.

Checked after every step on the step's loss and (pre-clip) gradient norm:

* non-finite loss or gradient norm: stop at once (that step's state is never saved);
* the loss above `loss_vs_start` x the first step's loss, or above `loss_vs_mean` x its running
  mean (an exponential mean over `window` steps of the healthy steps only), or
* the gradient norm below `grad_collapse` x the first step's (a saturated model: with
  `optim.lr=1e6` the loss sits at ln(vocab) with gradient norm 0),

for `patience` consecutive steps. While any of these holds the run is *suspicious* and the loop
saves no checkpoint, so the newest checkpoint is the last good one. The defaults (3x the start,
5x the mean, 1e-4 of the starting gradient norm, 5 steps) sit far outside what a fine-tune that
works ever shows; each is configurable in the recipe's `divergence:` section (0 turns it off).

>>> from train.config import DivergenceSection
>>> m = Monitor(DivergenceSection(patience=2))
>>> [m.update(s, 2.0, 1.0) for s in (1, 2)]
[None, None]
>>> m.update(3, 9.0, 1.0), m.healthy
(None, False)
>>> print(m.update(4, 9.0, 1.0))
the loss 9 stayed above 3x the first step's loss 2 for 2 steps (divergence.loss_vs_start)
"""

from __future__ import annotations

import math


class Monitor:
    """Feed it (step, loss, grad_norm) after every step; `update` returns why to stop, or None."""

    def __init__(self, cfg, start: dict | None = None):
        self.cfg = cfg
        start = start or {}
        self.loss0, self.grad0, self.mean = start.get("loss"), start.get("grad_norm"), start.get("mean")
        self.streak = 0

    @property
    def healthy(self) -> bool:
        """No suspicious step pending: a checkpoint now is a good one."""
        return self.streak == 0

    @property
    def state(self) -> dict:
        """What a resumed run needs to judge the same way (stored in every checkpoint)."""
        return {"loss": self.loss0, "grad_norm": self.grad0, "mean": self.mean}

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        c = self.cfg
        if self.loss0 is None:
            self.loss0, self.grad0, self.mean = loss, grad_norm, loss
            return None
        why = None
        if c.loss_vs_start and loss > c.loss_vs_start * self.loss0:
            why = f"the loss {loss:.4g} stayed above {c.loss_vs_start:g}x the first step's loss {self.loss0:.4g}"
            key = "loss_vs_start"
        elif c.loss_vs_mean and loss > c.loss_vs_mean * self.mean:
            why = f"the loss {loss:.4g} stayed above {c.loss_vs_mean:g}x its running mean {self.mean:.4g}"
            key = "loss_vs_mean"
        elif c.grad_collapse and grad_norm < c.grad_collapse * self.grad0:
            why = f"the gradient norm {grad_norm:.3g} stayed below {c.grad_collapse:g}x the first step's {self.grad0:.3g} (collapsed)"
            key = "grad_collapse"
        if why is None:
            self.streak = 0
            a = 1.0 / c.window
            self.mean = (1 - a) * self.mean + a * loss
            return None
        self.streak += 1
        if self.streak >= c.patience:
            return f"{why} for {self.streak} steps (divergence.{key})"
        return None
