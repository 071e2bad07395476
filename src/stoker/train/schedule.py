"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr.

A pure function of the step, so resuming needs only the step to continue it exactly.
"""

from __future__ import annotations

import math

from stoker.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = max(1, (cfg.decay_steps or cfg.steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def schedule_state(cfg: TrainConfig) -> dict:
    """What defines the schedule, stored in checkpoints so a resumed run can be checked against it."""
    return {"kind": "warmup_cosine", "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
            "decay_steps": cfg.decay_steps or cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}
