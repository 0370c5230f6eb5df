"""The validation set split across ranks (``ValidationSet.split_across_ranks``) against one process, with 2 gloo
processes on CPU (``torchrun``; the workers write what they measured to JSON, the tests below judge it).

* the set level: the mean loss, the mean gradient and every point's gradient (from the gathered factors) equal
  plain autograd over all points in one process (float64), for one batch split unevenly (3 + 2 points), two batches
  whose split crosses a batch boundary, and one point (rank 1's share is empty); each rank runs the loss function
  on its share only;
* the recorder level: a data-parallel loop (gradients all-reduced by hand, as DDP does) with the split set gives
  the values of a single-process run over the global batches, for SGD with momentum (ghost dot products with the
  gathered factors) and AdamW (all-reduced validation gradient), first and second order and per validation point;
  with ``split_validation`` off every rank evaluates every point, with it on each rank half of them;
* a step one rank cannot value is skipped on every rank (no rank waits in a collective), and a validation pass
  that fails on one rank raises on every rank.

The Lightning DDP and DeepSpeed paths (where the split is on by default) are checked end to end against single-
process runs by tests/test_callback_ddp.py and tests/test_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD, RANK_BATCH, STEPS = 2, 4, 4
VALUE_COLUMNS = ("value_1", "value_2", "grad_norm_sq", "value_1_per_val", "value_2_per_val")


# ------------------------------------------------------------------------------------------------ the worker


def _val_cases():
    from tests.test_inrun_values import make_data

    _, _, val7 = make_data(n=8, n_val=7, seed=11)
    first = {k: v[:3] for k, v in val7.items()}
    second = {k: v[3:] for k, v in val7.items()}
    return {
        "one batch of 5": {k: v[:5] for k, v in val7.items()},
        "batches of 3 and 4": [first, second],
        "one point": {k: v[:1] for k, v in val7.items()},
    }


def _points(data) -> dict:
    batches = data if isinstance(data, list) else [data]
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _set_level(rank: int) -> dict:
    """Loss, gradient and per-point gradients of the split set, with their independent references."""
    from inrun.engine.capture import GradientCapture
    from inrun.valuation.validation import ValidationSet
    from tests.test_inrun_values import loss_fn, make_mlp

    out = {}
    for name, data in _val_cases().items():
        model = make_mlp(seed=2)
        seen = [0]

        def counting_loss(module, batch):
            seen[0] += int(batch["y"].shape[0])
            return loss_fn(module, batch)

        capture = GradientCapture(model)
        capture.attach()
        validation = ValidationSet(data, counting_loss, model, capture)
        split = validation.split_across_ranks()
        params = dict(capture.parameters)
        loss = validation.loss()
        seen_by_loss = seen[0]
        grad_loss, grad = validation.gradient(params)
        per_point = validation.per_point_gradients()
        capture.detach()
        # the reference: plain autograd over every point, in this process, no capture and no split
        points = _points(data)
        model.eval()
        losses = loss_fn(model, points)
        want_grad = torch.autograd.grad(losses.mean(), list(params.values()), retain_graph=True)
        want_point = [torch.autograd.grad(losses[j], list(params.values()), retain_graph=True)
                      for j in range(losses.shape[0])]
        out[name] = {
            "split": split,
            "num_points": validation.num_points,
            "points_seen_by_loss": seen_by_loss,
            "loss_error": abs(loss - float(losses.mean())),
            "gradient_loss_error": abs(grad_loss - float(losses.mean())),
            "gradient_error": max(float((grad[n] - w).abs().max()) for n, w in zip(params, want_grad)),
            "per_point_error": max(float((per_point[n][j] - want_point[j][k]).abs().max())
                                   for k, n in enumerate(params) for j in range(losses.shape[0])),
            "per_point_count": int(next(iter(per_point.values())).shape[0]),
        }
    return out


def _global_ids(t: int) -> torch.Tensor:
    start = (t * RANK_BATCH * WORLD) % 32
    return torch.arange(start, start + RANK_BATCH * WORLD)


def _recorded_run(out: Path, tag: str, optimizer: str, rank: int, world: int, *, split: bool,
                  skip_at: int | None = None, per_val_point: bool = True) -> dict:
    """A data-parallel loop (``world`` ranks, gradients averaged by all-reduce) or, with world 1, the same steps
    over the global batches; returns the recorded rows and records, and how many validation points this rank ran."""
    import torch.distributed as dist

    from inrun.valuation.recorder import InRunRecorder
    from tests.test_inrun_values import adamw, batch_of, loss_fn, make_data, make_mlp, sgd_momentum_wd

    x, y, val = make_data(n=32, n_val=5, seed=5)
    model = make_mlp(seed=1)
    opt = (adamw if optimizer == "adamw" else sgd_momentum_wd)(model)
    seen = [0]

    def counting_loss(module, batch):
        if "index" not in batch:  # a validation batch
            seen[0] += int(batch["y"].shape[0])
        return loss_fn(module, batch)

    recorder = InRunRecorder(model, out / f"{tag}.h5", val_data=val, loss_fn=counting_loss, shapley="second",
                             per_val_point=per_val_point, rank=rank, world_size=world, gradient_divisor=float(world),
                             overwrite=True, record_norms=True)
    rows: list = []
    recorder.listeners.append(lambda row, records: rows.append(
        ({k: float(v) for k, v in row.items() if np.ndim(v) == 0},
         {k: np.asarray(v).tolist() for k, v in records.items()})))
    recorder.start()
    seen[0] = 0  # count from the first step on (start checks the data on every point)
    if split:
        assert recorder.validation.split_across_ranks()
    for t in range(STEPS):
        ids = _global_ids(t)
        ids = ids[rank * RANK_BATCH:(rank + 1) * RANK_BATCH] if world > 1 else ids
        batch = batch_of(x, y, ids)
        recorder.begin_microbatch(batch)
        loss_fn(model, batch).mean().backward()
        recorder.end_microbatch()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        if skip_at == t and rank == 1:
            recorder._skip_reason = "a non-finite factor on rank 1 (simulated)"
        recorder.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad()
    recorder.close()
    return {"rows": rows, "validation_points_run": seen[0],
            "assembled the mean gradient": bool(recorder.validation._prefers_gradient)}


def _failing_pass(rank: int) -> dict:
    """A validation loss that raises on rank 1 only: every rank must raise, and stay in step."""
    import torch.distributed as dist

    from inrun.engine.capture import GradientCapture
    from inrun.valuation.validation import ValidationSet
    from tests.test_inrun_values import loss_fn, make_mlp

    model = make_mlp(seed=2)

    def broken_on_rank_1(module, batch):
        if rank == 1:
            raise RuntimeError("broken validation batch on rank 1")
        return loss_fn(module, batch)

    capture = GradientCapture(model)
    capture.attach()
    validation = ValidationSet(_val_cases()["one batch of 5"], broken_on_rank_1, model, capture)
    validation.split_across_ranks()
    errors = {}
    for what, call in (("loss", validation.loss), ("gradient", lambda: validation.gradient(
            dict(model.named_parameters()))), ("captured", validation.captured)):
        try:
            call()
            errors[what] = "no error"
        except Exception as error:  # noqa: BLE001
            errors[what] = f"{type(error).__name__}: {error}"
    dist.barrier()  # still in step: one more collective works
    return errors


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"set": _set_level(rank), "runs": {}, "errors": _failing_pass(rank)}
    for optimizer in ("sgd-momentum", "adamw"):
        result["runs"][f"{optimizer} split"] = _recorded_run(out, f"{optimizer}-split", optimizer, rank, world,
                                                             split=True)
    result["runs"]["sgd-momentum split, values only"] = _recorded_run(
        out, "sgd-values-only", "sgd-momentum", rank, world, split=True, per_val_point=False)
    result["runs"]["adamw unsplit"] = _recorded_run(out, "adamw-unsplit", "adamw", rank, world, split=False)
    result["runs"]["sgd-momentum skip"] = _recorded_run(out, "skip", "sgd-momentum", rank, world, split=True,
                                                        skip_at=2)
    if rank == 0:  # the single-process references: same model, same global batches, nothing split
        for optimizer in ("sgd-momentum", "adamw"):
            result["runs"][f"{optimizer} single"] = _recorded_run(out, f"{optimizer}-single", optimizer, 0, 1,
                                                                  split=False)
    (out / f"result.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("valsplit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return [json.loads((out / f"result.rank{r}.json").read_text()) for r in range(WORLD)]


SHARES = {"one batch of 5": [2, 3], "batches of 3 and 4": [3, 4], "one point": [0, 1]}


@pytest.mark.parametrize("case", list(SHARES))
def test_split_set_equals_every_point_in_one_process(results, case):
    for rank, result in enumerate(results):
        got = result["set"][case]
        total = sum(SHARES[case])
        assert got["split"] and got["num_points"] == total and got["per_point_count"] == total
        assert got["points_seen_by_loss"] == SHARES[case][rank], (rank, got)  # each rank ran only its share
        assert got["loss_error"] < 1e-12 and got["gradient_loss_error"] < 1e-12, got
        assert got["gradient_error"] < 1e-12 and got["per_point_error"] < 1e-12, got


def _union(results: list[dict], run: str) -> list[dict]:
    """Per step: the ranks' records joined and ordered by sample id, and each rank's step row."""
    steps = []
    for t in range(STEPS):
        parts = [result["runs"][run]["rows"][t] for result in results]
        records = {k: np.concatenate([np.asarray(p[1][k]) for p in parts]) for k in parts[0][1]}
        order = np.argsort(records["sample_id"], kind="stable")
        steps.append({"rows": [p[0] for p in parts], "records": {k: v[order] for k, v in records.items()}})
    return steps


@pytest.mark.parametrize("optimizer,split", [("sgd-momentum", "split"), ("adamw", "split"), ("adamw", "unsplit"),
                                             ("sgd-momentum", "split, values only")])
def test_values_equal_a_single_process_run(results, optimizer, split):
    """Also without per-point values, where the split set assembles the mean gradient (its factors, 5 points of
    an MLP, are larger than the model) and the values come from fixed products instead of ghost dot products."""
    run = f"{optimizer} {split}"
    assert all(r["runs"][run]["assembled the mean gradient"] == (split == "split, values only") for r in results)
    got = _union(results, run)
    want = [{"rows": [row], "records": {k: np.asarray(v) for k, v in records.items()}}
            for row, records in results[0]["runs"][f"{optimizer} single"]["rows"]]
    for t in range(STEPS):
        ref = want[t]["records"]
        np.testing.assert_array_equal(got[t]["records"]["sample_id"], np.sort(ref["sample_id"]))
        order = np.argsort(ref["sample_id"], kind="stable")
        for column in VALUE_COLUMNS if "per_val" in " ".join(got[t]["records"]) else VALUE_COLUMNS[:3]:
            expected = ref[column][order]
            np.testing.assert_allclose(got[t]["records"][column], expected, rtol=1e-9,
                                       atol=1e-9 * np.abs(expected).max(), err_msg=f"{column} step {t}")
        for row in got[t]["rows"]:  # every rank's losses are those of the whole validation set
            for column in ("val_loss", "val_loss_base", "val_loss_after"):
                assert row[column] == pytest.approx(want[t]["rows"][0][column], rel=1e-12), (column, t)


def test_each_rank_runs_its_share_only_when_split(results):
    single = results[0]["runs"]["adamw single"]["validation_points_run"]
    split = [result["runs"]["adamw split"]["validation_points_run"] for result in results]
    unsplit = [result["runs"]["adamw unsplit"]["validation_points_run"] for result in results]
    assert single > 0 and unsplit == [single, single]
    assert sum(split) == single and split == [single * 2 // 5, single * 3 // 5]  # shares of 2 and 3 points of 5


def test_a_step_one_rank_cannot_value_is_skipped_on_every_rank(results):
    got = _union(results, "sgd-momentum skip")
    reference = _union(results, "sgd-momentum split")
    for rank in range(WORLD):
        skipped = [int(results[rank]["runs"]["sgd-momentum skip"]["rows"][t][0].get("skipped", 0))
                   for t in range(STEPS)]
        assert skipped == [0, 0, 1, 0], (rank, skipped)
    for t in (0, 1, 3):  # the other steps are valued as without the skip
        for column in ("value_1", "value_2"):
            np.testing.assert_allclose(got[t]["records"][column], reference[t]["records"][column], rtol=1e-9)


def test_a_failing_validation_pass_raises_on_every_rank(results):
    for what in ("loss", "gradient", "captured"):
        assert "broken validation batch on rank 1" in results[1]["errors"][what], results[1]["errors"]
        assert results[0]["errors"][what].startswith("RankShareError"), results[0]["errors"]


@pytest.mark.parametrize("val_batches", [1, 2])
def test_direction_norm_equals_the_validation_gradient_norm(val_batches):
    """``|D g_V|^2`` of the ghost path (per parameter by summed contributions or by Gram products, whichever is
    cheaper; one-hot embedding sides and a tied head take the Gram route) against autograd's mean gradient."""
    from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
    from inrun.engine.capture import GradientCapture
    from inrun.valuation.shapley import _direction_norm_sq
    from inrun.valuation.update_rules import UpdateTerms
    from inrun.valuation.validation import ValidationSet

    model = TinyGPT(TinyGPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16), seed=0).double()
    tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    points = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    batches = [{k: v[i::val_batches] for k, v in points.items()} for i in range(val_batches)]

    def loss(module, batch):
        return per_sample_lm_loss(module(batch["input_ids"]), batch["labels"]).double()

    capture = GradientCapture(model)
    capture.attach()
    _, parts = ValidationSet(batches, loss, model, capture).captured()
    capture.detach()
    params = dict(capture.parameters)
    scales = {name: 0.1 * (k + 1) for k, name in enumerate(params)}
    got = _direction_norm_sq({n: UpdateTerms(s, None) for n, s in scales.items()}, parts, n_val=4)
    model.eval()
    grads = torch.autograd.grad(loss(model, points).mean(), list(params.values()))
    want = sum(scales[n] ** 2 * float((g.double() ** 2).sum()) for n, g in zip(params, grads))
    assert got == pytest.approx(want, rel=1e-10)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
