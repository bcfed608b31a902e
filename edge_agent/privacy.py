"""Local differential privacy: the device clips and noises its own update before it leaves.

Use it when the aggregator is not trusted with raw updates. The noise is σ·C per coordinate
on every update, so it costs far more accuracy than noise added once per merged buffer at
the aggregator (``aggregator.privacy``); the guarantee holds whatever the aggregator does.
"""

from __future__ import annotations

import dataclasses
import logging

from edge_agent.trainers.base import FitResult
from edgefed.ml.privacy import (
    PrivacyAccountant,
    PrivacySettings,
    add_gaussian_noise,
    clip,
    new_generator,
)

log = logging.getLogger(__name__)


class DevicePrivacy:
    """Clips each fit's delta to C, adds N(0, (σC)²) noise, and counts the releases."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings
        self.accountant = PrivacyAccountant(settings, where="device")
        self._generator = new_generator(settings.seed)

    def apply(self, fit: FitResult) -> FitResult:
        """The fit with its delta privatised; seeds are dropped (the noise is dense)."""
        clipped, norm = clip(fit.delta, self.settings.clip_norm)
        std = self.settings.noise_multiplier * self.settings.clip_norm
        noised = add_gaussian_noise(clipped, std, self._generator)
        self.accountant.step()
        log.debug(
            "device DP: delta norm %.4g clipped to <= %.4g, noise std %.4g",
            norm,
            self.settings.clip_norm,
            std,
        )
        return dataclasses.replace(fit, delta=noised, seeds=None)
