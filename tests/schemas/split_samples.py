"""Split-learning messages for the codec's every-kind round trips."""

from __future__ import annotations

import torch

from schemas.messages import Message, SplitReply, SplitRequest

SPLIT_SAMPLES: list[Message] = [
    SplitRequest(
        step_id="step-1",
        client_id="dev-1",
        task_id="task-1",
        cut=2,
        tensors={
            "hidden": torch.linspace(-1, 1, 24).reshape(2, 3, 4),
            "attention_mask": torch.ones(2, 3, dtype=torch.int64),
            "labels": torch.tensor([[1, 2, -100], [3, 4, 5]]),
        },
    ),
    SplitReply(
        request_id="r-1",
        client_id="dev-1",
        accepted=True,
        loss=1.25,
        tensors={"grad": torch.full((2, 3, 4), 0.5)},
        server_s=0.01,
    ),
]
