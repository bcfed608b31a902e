"""The model a device trains for a task: the task's base model with its adapter attached."""

from __future__ import annotations

from peft import PeftModel

from edgefed.data.sources import num_labels
from edgefed.ml.models import attach_lora, build_model
from schemas.messages import ModelRef, Task


def task_model(task: Task, *, model: ModelRef | None = None, device: str = "cpu") -> PeftModel:
    """The model a device trains for ``task``, with the task's adapter attached, on ``device``.

    It is the task's model (or ``model``, a KD device's own), built from the task's seed.

    Raises:
        AssetMissing: The model is not installed.
    """
    labels = num_labels(task.dataset)
    base = build_model(model or task.model, seed=task.seed, num_labels=labels, device=device)
    return attach_lora(base, task.lora)
