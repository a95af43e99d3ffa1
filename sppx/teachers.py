"""Teacher strategies for recovery tuning: what the student learns from besides the text itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NoTeacher:
    """``teacher=none``: the language-modelling loss only."""

    name = "none"

    def loss(
        self, model: nn.Module, input_ids: torch.Tensor, logits: torch.Tensor, lm_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and extra terms to log, given the student's logits and LM loss."""
        return lm_loss, {}


TEACHERS = {"none": NoTeacher}
