"""Knowledge-distillation losses: softened-logit KL and per-layer hidden-state MSE.

Every loss is exactly zero when the student's outputs equal the teacher's and sees only the tokens a
``token_mask`` selects (all tokens when it is None; padding is left out). Two normalisations:

- per token: the KL averaged over tokens (:func:`logit_kl`), the relative hidden-state error averaged
  over layers (:func:`hidden_mse`);
- NutePrune's reference: the KL summed over tokens and vocabulary and divided by the number of
  sequences (``F.kl_div(..., reduction="batchmean")`` on (batch, seq, vocab) logits; ``per="sequence"``),
  and the absolute mean squared error over the non-zero entries of each layer's hidden state, summed
  over layers (:func:`layer_mse_sum`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _selected(t: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, d) -> (tokens, d), keeping the tokens ``token_mask`` (batch, seq) marks."""
    flat = t.reshape(-1, t.shape[-1])
    return flat if token_mask is None else flat[token_mask.reshape(-1).bool()]


class _SoftTargetKL(torch.autograd.Function):
    """KL(teacher || student) at temperature T, summed over tokens, in chunks of rows.

    The gradient with respect to the student's logits, (softmax(s / T) - softmax(t / T)) / T, is computed
    in the forward pass and kept: the loss is a leaf of the graph, so nothing else needs saving, and no
    (tokens x vocabulary) temporary other than that gradient outlives a chunk (autograd would keep the
    student's log-probabilities, the teacher's log-probabilities and several elementwise temporaries).
    ``teacher_rows(rows)`` gives the teacher's logits of a slice of rows, so they can be computed a
    chunk at a time from the teacher's last hidden state."""

    @staticmethod
    def forward(ctx, student, teacher_rows, temperature: float, chunk_rows: int):
        grad = torch.empty_like(student, dtype=torch.float32) if student.requires_grad else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, student.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            s_log = F.log_softmax(student[rows].float() / temperature, dim=-1)
            t_log = F.log_softmax(teacher_rows(rows).float() / temperature, dim=-1)
            t_prob = t_log.exp()
            total += (t_prob * (t_log - s_log)).sum(dtype=torch.float64)
            if grad is not None:
                grad[rows] = (s_log.exp_() - t_prob) / temperature
        ctx.grad = grad
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad * grad_output
        ctx.grad = None
        return grad, None, None, None


def logit_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    token_mask: torch.Tensor | None = None,
    chunk_rows: int = 256,
    *,
    teacher_hidden: torch.Tensor | None = None,
    head: nn.Module | None = None,
    per: str = "token",
) -> torch.Tensor:
    """KL(teacher || student) of the distributions softened by ``temperature``, times T^2 (so gradients
    keep their scale across temperatures), summed over the selected tokens and divided by their number
    (``per="token"``) or by ``student_logits.shape[0]``, the number of sequences of (batch, seq, vocab)
    logits (``per="sequence"``: ``F.kl_div``'s ``batchmean``). Computed in fp32, ``chunk_rows`` tokens at a time (see
    :class:`_SoftTargetKL`). The teacher is given by its logits, or by its last hidden state and output
    ``head`` (then its logits never exist for all tokens at once)."""
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    s = _selected(student_logits, token_mask)
    if teacher_logits is not None:
        t = _selected(teacher_logits, token_mask).detach()

        def teacher_rows(rows):
            return t[rows]
    else:
        if teacher_hidden is None or head is None:
            raise ValueError("give the teacher's logits, or its last hidden state and output head")
        h = _selected(teacher_hidden, token_mask).detach()

        def teacher_rows(rows):
            with torch.no_grad():
                return head(h[rows])

    kl = _SoftTargetKL.apply(s, teacher_rows, float(temperature), chunk_rows)
    divisor = s.shape[0] if per == "token" else student_logits.shape[0]
    return kl * temperature**2 / max(divisor, 1)


def hidden_mse(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layers of the relative squared error ||h_s - h_t||^2 / ||h_t||^2 of the hidden states
    (the embeddings' output is skipped: it is never pruned). Relative, so layers whose activations are
    large (outlier features) do not dominate the sum."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    terms = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        s, t = _selected(hs, token_mask).float(), _selected(ht, token_mask).float()
        terms.append(F.mse_loss(s, t, reduction="sum") / t.pow(2).sum().clamp(min=1e-12))
    return torch.stack(terms).mean()


def layer_mse_sum(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """NutePrune's layer loss: per layer (the embeddings' output skipped), the mean of (h_s - h_t)^2 over
    the entries where the student's hidden state is non-zero (the selected tokens only), summed over the
    layers. Absolute, in fp32."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    total = None
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        s, t = _selected(hs, token_mask).float(), _selected(ht, token_mask).float()
        kept = s != 0
        term = (s[kept] - t[kept]).pow(2).mean() if kept.any() else s.sum() * 0.0
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no decoder layer's hidden state to distil")
    return total
