"""The step's completeness check with several ranks, against a fake collective: two recorders in two threads of one
process, each with its own copy of the model and its own samples, and a sum over the "ranks" made of a barrier.

The data-parallel gradient each rank hands the optimizer is computed here independently of inrun: each rank's
autograd gradient of its mean loss, averaged over the two ranks (as DDP and DeepSpeed do). The real collectives run
in tests/test_checks_distributed.py (DeepSpeed ZeRO-2/3 and Lightning DDP under torchrun).
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun import ExactnessError
from inrun.valuation.recorder import InRunRecorder

WORLD, N, D_IN, N_CLASSES = 2, 4, 5, 3
PENALTY = 0.05


class FakeGroup:
    """``sum_over_ranks`` for threads: every rank hands in a tensor, each gets the same sum back (in rank order)."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def sum_for(self, rank: int):
        def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()  # every rank has read the slots before any rank writes its next tensor
            return tensor.copy_(total)

        return sum_over_ranks


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, N_CLASSES)).double()


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def batch_of(rank: int, step: int, n: int = N) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"x": torch.randn(n, D_IN, generator=g, dtype=torch.float64),
            "y": torch.randint(0, N_CLASSES, (n,), generator=g), "index": torch.arange(n) + (step * WORLD + rank) * N}


def run_ranks(tmp_path, *, steps: int = 2, penalty: bool = False, empty: tuple[int, int] | None = None,
              check_every: int | None = None):
    """Train ``steps`` steps on two thread-ranks; returns (recorders, errors by rank, the fake group)."""
    group = FakeGroup(WORLD)
    val = {"x": torch.randn(3, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(9)),
           "y": torch.tensor([0, 1, 2])}
    models = [make_model() for _ in range(WORLD)]
    recorders = [InRunRecorder(models[r], tmp_path / "run.h5", val_data=val, loss_fn=loss_fn, rank=r,
                               world_size=WORLD, run_id="fake", gradient_divisor=float(WORLD), overwrite=True,
                               check_every=check_every) for r in range(WORLD)]
    for r, recorder in enumerate(recorders):
        recorder.checks.sum_over_ranks = group.sum_for(r)
    errors: dict[int, BaseException] = {}
    average = FakeGroup(WORLD)  # the test's own data-parallel averaging of the gradients (not inrun's)

    def train(rank: int) -> None:
        model, recorder = models[rank], recorders[rank]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        reduce = average.sum_for(rank)
        try:
            recorder.start()
            for step in range(steps):
                batch = batch_of(rank, step, 0 if empty == (rank, step) else N)
                recorder.begin_microbatch(batch)
                loss = loss_fn(model, batch).sum() / max(1, batch["x"].shape[0])
                if penalty:
                    loss = loss + PENALTY * model[0].weight.pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                recorder.end_microbatch()
                params = list(model.parameters())
                flat = reduce(torch.cat([p.grad.reshape(-1) for p in params])) / WORLD
                torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
                recorder.before_optimizer_step(optimizer)
                optimizer.step()
            recorder.close(final=False)
        except BaseException as error:  # noqa: BLE001 -- reported to the test
            errors[rank] = error
            recorder.close(final=False)

    threads = [threading.Thread(target=train, args=(r,)) for r in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a rank hangs in a collective"
    return recorders, errors, group


def test_correct_model_passes_the_step_check_over_ranks(tmp_path):
    recorders, errors, group = run_ranks(tmp_path)
    assert not errors, errors
    for recorder in recorders:
        assert recorder.checks.runs == {"batch": 1, "step": 1}
    assert group.calls == [2, 2]  # at the checked step: the batch check's agreement and the step's one sum


def test_penalty_outside_loss_fn_is_refused_on_every_rank(tmp_path):
    """The L2 penalty's gradient reaches the optimizer but no sample: the batch check (loss_fn only) cannot see it."""
    recorders, errors, _ = run_ranks(tmp_path, penalty=True)
    assert sorted(errors) == [0, 1]
    for rank, error in errors.items():
        assert isinstance(error, ExactnessError), error
        assert re.search(r"parameter '0\.weight'", str(error)), error
        assert recorders[rank].checks.runs == {"batch": 1, "step": 1}


def test_a_rank_with_an_empty_microbatch_takes_part_and_no_rank_compares(tmp_path):
    """Rank 1's first micro-batch is empty: it still enters both collectives (no hang); the step is skipped there,
    so no rank compares; with check_every=1 the next step is compared on both."""
    recorders, errors, group = run_ranks(tmp_path, empty=(1, 0), check_every=1)
    assert not errors, errors
    assert recorders[0].checks.runs == {"batch": 2, "step": 1}
    assert recorders[1].checks.runs == {"batch": 1, "step": 1}
    assert group.calls == [4, 4]


def test_one_rank_failing_the_batch_check_stops_every_rank(tmp_path, monkeypatch):
    """Rank 0's batch check fails (made to, here): rank 1, whose own samples passed, raises too instead of going on
    alone into the next collective."""
    from inrun.engine import checks

    original = checks.checked_capture

    def failing_on_rank_0(capture, model, loss_fn, batch, **kwargs):
        if int(batch["index"][0]) < N:  # rank 0's samples at step 0
            raise ExactnessError("parameter '2.weight' cannot be attributed exactly (made to fail here)")
        return original(capture, model, loss_fn, batch, **kwargs)

    monkeypatch.setattr(checks, "checked_capture", failing_on_rank_0)
    _, errors, _ = run_ranks(tmp_path)
    assert sorted(errors) == [0, 1]
    assert "made to fail here" in str(errors[0])
    assert isinstance(errors[1], ExactnessError)
    assert "failed on 1 other rank(s) of this data-parallel run for parameter '2.weight'" in str(errors[1])


@pytest.mark.parametrize("world_size", [1, 2])
def test_without_a_collective_several_ranks_skip_only_the_step_check(tmp_path, world_size):
    """The plain recorder under a user's own DDP (no collective handed over): the batch check still runs."""
    model = make_model()
    recorder = InRunRecorder(model, tmp_path / "run.h5", val_data=batch_of(0, 9), loss_fn=loss_fn, rank=0,
                             world_size=world_size, run_id="plain", overwrite=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder.start()
    batch = batch_of(0, 0)
    recorder.begin_microbatch(batch)
    loss_fn(model, batch).mean().backward()
    recorder.end_microbatch()
    recorder.before_optimizer_step(optimizer)
    recorder.close(final=False)
    assert recorder.checks.runs == {"batch": 1, "step": 1 if world_size == 1 else 0}
