"""A functional AdamW: torch.optim.AdamW's update, out of place and differentiable (used by TAPT).

Tensors of any shape, e.g. B stacked copies: B independent optimisers in one op per tensor; the
adaptive attack differentiates through the update (:func:`_safe_sqrt` keeps that gradient finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AdamWState:
    step: int
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


def adamw_init(params: dict[str, torch.Tensor]) -> AdamWState:
    return AdamWState(0, {k: torch.zeros_like(v) for k, v in params.items()},
                      {k: torch.zeros_like(v) for k, v in params.items()})


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not NaN) at 0, for differentiating through the update."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def adamw_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: AdamWState, *,
               lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01) -> tuple[dict[str, torch.Tensor], AdamWState]:
    """torch.optim.AdamW's update (decoupled decay, bias correction), out of place and differentiable.

    Tensors of any shape, e.g. B stacked copies: B independent optimisers in one op per tensor.
    """
    t = state.step + 1
    b1, b2 = betas
    step_size, bc2_sqrt = lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)
    new, m_out, v_out = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = torch.lerp(state.exp_avg[k], g, 1 - b1)
        v = torch.addcmul(state.exp_avg_sq[k] * b2, g, g, value=1 - b2)
        denom = _safe_sqrt(v) / bc2_sqrt + eps
        new[k] = torch.addcdiv(p * (1 - lr * weight_decay), m, denom, value=-step_size)
        m_out[k], v_out[k] = m, v
    return new, AdamWState(t, m_out, v_out)
