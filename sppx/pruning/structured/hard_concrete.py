"""Hard-concrete (L0) gates (Louizos et al. 2018), as CoFi, Sheared-LLaMA and NutePrune use them.

A gate z in [0, 1] is a stretched and clipped binary-concrete sample driven by one learnable
``log_alpha``: with u ~ U(eps, 1 - eps),

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),    z = clamp(s (zeta - gamma) + gamma, 0, 1).

The stretch (gamma < 0 < 1 < zeta) puts probability mass on exactly 0 and exactly 1, and
P(z > 0) = 1 - sigmoid(beta log(-gamma / zeta) - log_alpha) is differentiable in ``log_alpha``: it is
what an expected-size penalty is made of. NutePrune's reference starts the gates open and clamps
``log_alpha`` to [log 1e-2, log 1e2] after every optimizer step (:meth:`HardConcrete.constrain`). Its
deterministic gates close, per row (a layer), the rounded expected number of closed gates, lowest
``log_alpha`` first, and give the others the soft value sigmoid(0.8 log_alpha / beta)
(:meth:`HardConcrete.deterministic_rows`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

GAMMA = -0.1  # lower end of the stretched interval
ZETA = 1.1  # upper end of the stretched interval
BETA = 2.0 / 3.0  # temperature of the binary concrete
EPS = 1e-6  # u is drawn from U(EPS, 1 - EPS) so that log u and log(1 - u) stay finite
LOG_ALPHA_MIN = math.log(1e-2)  # log_alpha is clamped to [LOG_ALPHA_MIN, LOG_ALPHA_MAX] after each step
LOG_ALPHA_MAX = math.log(1e2)
SOFT_SLOPE = 0.8  # a kept deterministic gate is sigmoid(SOFT_SLOPE * log_alpha / beta)


def keep_probability(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
    """P(z > 0) of each gate: 1 - sigmoid(beta log(-gamma / zeta) - log_alpha)."""
    return 1.0 - torch.sigmoid(beta * math.log(-gamma / zeta) - log_alpha)


def hard_concrete(
    log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> torch.Tensor:
    """The gates for given uniform noise ``u`` (same shape as ``log_alpha``, values in (0, 1))."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def log_alpha_for(droprate: float) -> float:
    """CoFi's initial ``log_alpha`` for a drop rate d: log(1 - d) - log(d) (0 for d = 0.5, which keeps a
    gate with probability 1 - sigmoid(beta log(-gamma / zeta)) = 0.83)."""
    return math.log(1.0 - droprate) - math.log(droprate)


def soft_gate(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """The value of a kept deterministic gate: sigmoid(0.8 log_alpha / beta) (about E[z]: 0.5 at
    log_alpha 0, 0.996 at the upper clamp)."""
    return torch.sigmoid(SOFT_SLOPE * log_alpha / beta)


def lowest_zeroed(scores: torch.Tensor, zeros: int) -> torch.Tensor:
    """A 0/1 float mask shaped like ``scores``: the ``zeros`` lowest scores (over all entries, ties to the
    lower flat index) get 0, the others 1."""
    flat = scores.detach().reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.float32)
    zeros = max(0, min(int(zeros), flat.numel()))
    if zeros:
        mask[torch.sort(flat.float(), stable=True).indices[:zeros]] = 0.0
    return mask.reshape(scores.shape)


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates (``shape``: e.g. layers x heads), one ``log_alpha`` each.

    ``log_alpha`` starts at ``log_alpha_init``, or :func:`log_alpha_for` (``droprate_init``) when it is
    None, plus Gaussian noise of std ``init_std`` (breaks ties between otherwise identical gates;
    ``generator`` makes it reproducible)."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        droprate_init: float = 0.5,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
        log_alpha_init: float | None = None,
    ):
        super().__init__()
        if not 0 < droprate_init < 1:
            raise ValueError(f"droprate_init must be in (0, 1), got {droprate_init}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        mean = log_alpha_for(droprate_init) if log_alpha_init is None else float(log_alpha_init)
        init = mean + init_std * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter(init)

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp ``log_alpha`` to [log 1e-2, log 1e2] (after every optimizer step)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def sample(self, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
        """Training gates: a fresh sample (differentiable in ``log_alpha``), or the one fixed by ``u``."""
        if u is None:
            u = torch.rand(
                self.log_alpha.shape, generator=generator, device=self.log_alpha.device, dtype=torch.float32
            )
            u = u * (1.0 - 2.0 * EPS) + EPS
        return hard_concrete(self.log_alpha, u.to(self.log_alpha))

    def keep_prob(self) -> torch.Tensor:
        """P(z > 0) of every gate (differentiable)."""
        return keep_probability(self.log_alpha)

    def expected_kept(self) -> torch.Tensor:
        """Expected number of gates that are not exactly 0."""
        return self.keep_prob().sum()

    def expected_zeros(self) -> torch.Tensor:
        return self.log_alpha.numel() - self.expected_kept()

    @torch.no_grad()
    def deterministic(self, zeros: int | None = None) -> torch.Tensor:
        """0/1 gates: the ``zeros`` lowest ``log_alpha`` (over the whole tensor) closed; by default
        ``zeros`` is the rounded expected number of closed gates (CoFi's deterministic mask)."""
        if zeros is None:
            zeros = round(float(self.expected_zeros()))
        return lowest_zeroed(self.log_alpha, zeros).to(self.log_alpha.device)

    @torch.no_grad()
    def deterministic_rows(self, soft: bool = True) -> torch.Tensor:
        """Per row (the last dimension's gates of one layer) the rounded expected number of closed gates
        get 0, lowest ``log_alpha`` first; the others 1, or with ``soft`` :func:`soft_gate`."""
        la = self.log_alpha.detach()
        rows = la.reshape(-1, la.shape[-1])
        zeros = (rows.shape[1] - keep_probability(rows).sum(dim=1)).round().long().tolist()
        kept = soft_gate(rows) if soft else torch.ones_like(rows)
        mask = torch.stack([lowest_zeroed(row, k) for row, k in zip(rows, zeros, strict=True)])
        return (kept * mask.to(kept)).reshape(la.shape)
