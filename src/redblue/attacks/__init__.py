"""Evasion attacks: functions on tensors returning adversarial images in the eps-ball and [0, 1]."""

from __future__ import annotations

from redblue.attacks.fgsm import fgsm
from redblue.attacks.pgd import pgd

__all__ = ["fgsm", "pgd"]
