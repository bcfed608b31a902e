import math

import torch

from edge_agent.trainers.batches import cut_to_length
from edge_agent.trainers.fwdgrad_progress import FitProgress, StepSettings
from edgefed.ml.tokens import TokenBatch
from schemas.messages import SeedStep


def test_unpadded_rows_are_cut_to_the_task_length():
    batch = TokenBatch(input_ids=torch.arange(12).view(2, 6), labels=torch.arange(12).view(2, 6))
    cut = cut_to_length(batch, 4)
    assert cut.input_ids.shape == (2, 4)
    assert cut.labels.shape == (2, 4)


def test_padded_and_row_labelled_batches_are_left_alone():
    ids = torch.arange(12).view(2, 6)
    padded = TokenBatch(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    per_row = TokenBatch(input_ids=ids, labels=torch.tensor([0, 1]))
    assert cut_to_length(padded, 4) is padded
    assert cut_to_length(per_row, 4) is per_row


def test_undoing_the_last_step_restores_the_total_before_it():
    progress = FitProgress(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    step = SeedStep(seed=1, indices=(0,), d=(0.5,))
    progress.take(step, torch.ones(3, dtype=torch.float64), 0.25)
    progress.take(step, torch.full((3,), 2.0, dtype=torch.float64), None)
    assert progress.undo_last()
    assert progress.total.tolist() == [1.0, 1.0, 1.0]
    assert progress.steps == [step]
    assert progress.variance == 0.25
    assert progress.undo_last()
    assert not progress.undo_last()
    assert progress.variance is None
    assert math.isnan(progress.train_loss)


def test_clip_scale_only_shrinks_steps_beyond_the_bound():
    settings = StepSettings(count=1, lr=1.0, bound=2.0, direction=None, choices=None, chance=0.0)
    assert settings.clip_scale(1.0) == 1.0
    assert settings.clip_scale(8.0) == 0.25
    unbounded = StepSettings(count=1, lr=1.0, bound=None, direction=None, choices=None, chance=0.0)
    assert unbounded.clip_scale(1e9) == 1.0
