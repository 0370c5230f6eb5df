"""Data value embeddings (inrun.posthoc) against independent references.

The references use nothing from inrun but the recorded store read with h5py: per-sample gradients come from
``torch.func`` (tests/reference.py) at the parameters saved before every step, contributions are those gradients
divided by the batch size (mean-reduced loss), and the embeddings are explicit matrix products

    DVEmb^(s)(z) = eta_s prod_{k=s+1}^{T-1} (I - eta_k H_k) c_s(z),   H_k = gamma_k sum_{j in B_k} c_j c_j^T.

The recursion of ALGORITHMS.md is block-diagonal per layer block (one M per parameter), so the reference uses a
block-diagonal H too: H_k restricted to each parameter separately, never the cross-parameter blocks.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun.posthoc import build as dv_build
from inrun.posthoc import embeddings as dv
from inrun.posthoc.record import EmbeddingsError
from inrun.valuation.recorder import InRunRecorder
from tests.reference import per_sample_grads

DTYPE = torch.float64
N_IN, N_HIDDEN, N_OUT = 4, 5, 3
N_TRAIN, BATCH, EPOCHS = 24, 6, 2
LR = 0.3


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def make_model(hidden: int = N_HIDDEN, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, hidden), nn.Tanh(), nn.Linear(hidden, N_OUT)).to(DTYPE)


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, N_IN, generator=g, dtype=DTYPE)
    y = torch.randint(0, N_OUT, (N_TRAIN,), generator=g)
    test = {"x": torch.randn(3, N_IN, generator=g, dtype=DTYPE), "y": torch.randint(0, N_OUT, (3,), generator=g)}
    return x, y, test


def make_order(seed: int = 5) -> list[torch.Tensor]:
    order = []
    for epoch in range(EPOCHS):
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed + epoch))
        order += [perm[i: i + BATCH] for i in range(0, N_TRAIN, BATCH)]
    return order


class Recorded:
    """A recorded tiny SGD run and the parameters before every step (for the references)."""

    def __init__(self, path: Path, model: nn.Module, params: list[dict], order, x, y, test, lr):
        self.path, self.model, self.params, self.order = path, model, params, order
        self.x, self.y, self.test, self.lr = x, y, test, lr


def record(path: Path, *, embeddings=None, lr: float = LR, shapley=None, removal=None) -> Recorded:
    """Train the tiny MLP with plain SGD under InRunRecorder; ``removal=(id, steps)``: loss weight 0 there."""
    x, y, test = make_data()
    order = make_order()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = None
    if path is not None:
        recorder = InRunRecorder(model, path, val_data=test, loss_fn=loss_fn, shapley=shapley, overwrite=True,
                                 embeddings=embeddings if embeddings is not None else {"k_rows": 8, "k_cols": 8})
        recorder.start()
    params = []
    for step, ids in enumerate(order):
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        batch = {"x": x[ids], "y": y[ids], "index": ids}
        weights = torch.ones(len(ids), dtype=DTYPE)
        if removal is not None and step in removal[1]:
            weights[ids == removal[0]] = 0
        if recorder:
            recorder.begin_microbatch(batch)
        loss = (loss_fn(model, batch) * weights).sum() / len(ids)
        loss.backward()
        if recorder:
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    if recorder:
        recorder.close()
    return Recorded(path, model, params, order, x, y, test, lr)


def model_at(model: nn.Module, params: dict) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(params[name])
    return m


def read_layout(path: Path) -> tuple[list[dict], dict[int, dict[str, np.ndarray]]]:
    with h5py.File(path, "r", locking=False) as f:
        layout = json.loads(f["projection"].attrs["layout"])
        mats = {i: {side: f[f"projection/{i}/{side}"][()] for side in ("rows", "cols") if f"projection/{i}/{side}" in f}
                for i in range(len(layout))}
    return layout, mats


def project(grads: dict[str, torch.Tensor], layout: list[dict], mats: dict) -> np.ndarray:
    """Explicit projection of full per-sample gradients ``{name: [n, *shape]}`` with the stored matrices."""
    parts = []
    for i, block in enumerate(layout):
        g = grads[block["name"]].detach().double().numpy()
        n = g.shape[0]
        if block["kind"] == "outer":
            g = g.reshape(n, block["rows"], block["cols"])
            if "rows" in mats[i]:
                g = np.einsum("kr,nrc->nkc", mats[i]["rows"], g)
            if "cols" in mats[i]:
                g = np.einsum("nrc,kc->nrk", g, mats[i]["cols"])
        else:
            g = g.reshape(n, -1)
            if "rows" in mats[i]:
                g = g @ mats[i]["rows"].T
        parts.append(g.reshape(n, -1))
    return np.concatenate(parts, axis=1)


def reference_contributions(rec: Recorded, layout, mats) -> list[np.ndarray]:
    """Projected c_s(z) of every step, rows in batch order: torch.func gradients at theta_s divided by B."""
    out = []
    for step, ids in enumerate(rec.order):
        batch = {"x": rec.x[ids], "y": rec.y[ids]}
        grads = per_sample_grads(model_at(rec.model, rec.params[step]), loss_fn, batch)
        out.append(project(grads, layout, mats) / len(ids))
    return out


def reference_embeddings(contribs: list[np.ndarray], layout, lr: float, gamma, until: int | None = None) -> list[np.ndarray]:
    """Explicit eta_s (I - eta_{T-1} H_{T-1}) ... (I - eta_{s+1} H_{s+1}) c_s per block (block-diagonal H), T = until."""
    until = len(contribs) if until is None else until
    out = [np.full_like(c, np.nan) for c in contribs]
    for block in layout:
        sl = slice(block["offset"], block["offset"] + block["k_rows"] * block["k_cols"])
        k = sl.stop - sl.start
        for s in range(until):
            product = np.eye(k)
            for t in range(s + 1, until):
                c = contribs[t][:, sl]
                g = len(c) if gamma == "batch" else gamma
                product = (np.eye(k) - lr * g * c.T @ c) @ product  # later steps act last (leftmost)
            out[s][:, sl] = lr * contribs[s][:, sl] @ product.T
    return out


def read_records(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        n = int(f.attrs["committed_rows"])
        return {k: f["records"][k][:n] for k in f["records"]}


def emb_rows(path: Path, name: str = "embeddings") -> np.ndarray:
    with h5py.File(path, "r", locking=False) as f:
        return f[name][()]


def per_record(per_step: list[np.ndarray], records: dict) -> np.ndarray:
    """Stack per-step arrays (rows in batch order) into record order (the recorder writes batch order per step)."""
    out = np.zeros((len(records["step"]), per_step[0].shape[1]))
    for s in range(len(per_step)):
        out[records["step"] == s] = per_step[s]
    return out


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory) -> Recorded:
    """Projection sizes >= layer sizes (identity, exact), orthogonal family."""
    return record(tmp_path_factory.mktemp("exact") / "run.h5", embeddings={"k_rows": 8, "k_cols": 8, "kind": "orthogonal"})


@pytest.fixture(scope="module")
def projected_run(tmp_path_factory) -> Recorded:
    """A real (Gaussian) projection: the 5 x 4 and 3 x 5 weights projected to 2 x 3 (biases, at most 6 numbers, kept)."""
    return record(tmp_path_factory.mktemp("proj") / "run.h5", embeddings={"k_rows": 2, "k_cols": 3})


# ------------------------------------------------------------------------------------------------ the recursion


@pytest.mark.parametrize("gamma", ["batch", 1.0])
def test_recursion_matches_explicit_unprojected_reference(exact_run, tmp_path, gamma):
    layout, mats = read_layout(exact_run.path)
    assert all(not m for m in mats.values()), "projection sizes >= layer sizes must keep every side whole"
    contribs = reference_contributions(exact_run, layout, mats)
    records = read_records(exact_run.path)
    # the stored projected contributions are the reference contributions (float32 storage)
    np.testing.assert_allclose(records["proj_grad"], per_record(contribs, records), rtol=1e-5, atol=1e-7)
    out = dv_build.build_embeddings(exact_run.path, tmp_path / "e.h5", dtype="float64", hessian_scale=gamma, progress=False)
    expected = per_record(reference_embeddings(contribs, layout, exact_run.lr, gamma), records)
    got = emb_rows(out)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    # the Hessian term matters here: H = 0 (TracIn) would differ clearly
    tracin_like = per_record([exact_run.lr * c for c in contribs], records)
    assert np.abs(tracin_like - expected).max() > 100 * np.abs(got - expected).max()
    # per-sample sums over occurrences (removal from all epochs)
    with h5py.File(out, "r", locking=False) as f:
        ids, sums, occ = f["sample_ids"][()], f["sums"][()], f["occurrences"][()]
        assert int(f.attrs["complete"]) == 1
    assert list(ids) == sorted(set(records["sample_id"].tolist()))
    for k, i in enumerate(ids):
        np.testing.assert_allclose(sums[k], expected[records["sample_id"] == i].sum(0), rtol=1e-5, atol=1e-8)
    assert (occ == EPOCHS).all()


def explicit_recursion(records: dict, scales: np.ndarray, layout: list[dict], gamma="batch", until=None) -> np.ndarray:
    """ALGORITHMS.md's backward recursion on the stored projected vectors, in memory with numpy."""
    g_all = records["proj_grad"].astype(np.float64)
    steps = records["step"]
    until = steps.max() + 1 if until is None else until
    out = np.full_like(g_all, np.nan)
    for b, block in enumerate(layout):
        sl = slice(block["offset"], block["offset"] + block["k_rows"] * block["k_cols"])
        m = np.zeros((sl.stop - sl.start,) * 2)
        for s in range(until - 1, -1, -1):
            rows = np.flatnonzero(steps == s)
            g = g_all[rows][:, sl]
            e = scales[s, b] * (g - g @ m.T)
            out[rows, sl] = e
            m += (len(rows) if gamma == "batch" else gamma) * e.T @ g
    return out


def test_projected_build_matches_in_memory_recursion_for_any_chunking(projected_run, tmp_path):
    layout, mats = read_layout(projected_run.path)
    assert any(mats.values()), "this fixture must project at least one side"
    records = read_records(projected_run.path)
    with h5py.File(projected_run.path, "r", locking=False) as f:
        scales = f["steps/proj_scale"][()]
    np.testing.assert_allclose(scales, LR)
    expected = explicit_recursion(records, scales, layout)
    results = []
    for chunk in (1, 3, 64):
        out = dv_build.build_embeddings(projected_run.path, tmp_path / f"c{chunk}.h5", chunk_steps=chunk, dtype="float64",
                                  progress=False)
        results.append(emb_rows(out))
        np.testing.assert_allclose(results[-1], expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(results[0], results[1])
    # a byte budget smaller than one step still makes progress, one step per chunk
    out = dv_build.build_embeddings(projected_run.path, tmp_path / "tiny.h5", max_chunk_bytes=1, dtype="float64", progress=False)
    np.testing.assert_array_equal(emb_rows(out), results[0])
    # float32 arithmetic agrees to float32 precision
    out = dv_build.build_embeddings(projected_run.path, tmp_path / "f32.h5", chunk_steps=2, progress=False)
    np.testing.assert_allclose(emb_rows(out), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_projected_contributions_match_explicit_projection(projected_run):
    layout, mats = read_layout(projected_run.path)
    records = read_records(projected_run.path)
    contribs = reference_contributions(projected_run, layout, mats)
    np.testing.assert_allclose(records["proj_grad"], per_record(contribs, records), rtol=1e-5, atol=1e-7)


def test_interrupted_build_resumes_to_the_same_result(projected_run, tmp_path, monkeypatch):
    whole = emb_rows(dv_build.build_embeddings(projected_run.path, tmp_path / "whole.h5", chunk_steps=2, dtype="float64",
                                         progress=False))
    out = tmp_path / "broken.h5"
    real_commit = dv_build._commit_chunk
    calls = {"n": 0}

    def crash_after_two(f, blocks, below):
        calls["n"] += 1
        if calls["n"] == 3:  # the chunk's embeddings are written, its state is not: the worst moment
            raise KeyboardInterrupt("simulated crash")
        real_commit(f, blocks, below)

    monkeypatch.setattr(dv_build, "_commit_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dv_build.build_embeddings(projected_run.path, out, chunk_steps=2, dtype="float64", progress=False)
    monkeypatch.setattr(dv_build, "_commit_chunk", real_commit)
    with h5py.File(out, "r", locking=False) as f:
        assert int(f.attrs["complete"]) == 0
        assert json.loads(f.attrs["progress"])["below"] == 4  # steps 4..7 done and committed
    # queries refuse the half-built file and say how to finish it
    run = inrun.open_run(projected_run.path)
    with pytest.raises(EmbeddingsError, match=r"incomplete.*build_embeddings"):
        dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, embeddings=out)
    # rerunning continues (it does not start over: count the chunks it commits)
    counted = {"n": 0}

    def counting(f, blocks, below):
        counted["n"] += 1
        real_commit(f, blocks, below)

    monkeypatch.setattr(dv_build, "_commit_chunk", counting)
    dv_build.build_embeddings(run, out, chunk_steps=2, dtype="float64", progress=False)
    assert counted["n"] == 2
    np.testing.assert_allclose(emb_rows(out), whole, rtol=1e-12, atol=0)
    # a complete file is left alone; another configuration is refused unless resume=False
    dv_build.build_embeddings(run, out, chunk_steps=2, dtype="float64", progress=False)
    assert counted["n"] == 2
    with pytest.raises(EmbeddingsError, match="resume=False"):
        dv_build.build_embeddings(run, out, dtype="float64", hessian_scale=1.0, progress=False)
    run.close()


def test_influence_checkpointing_equals_truncated_reference(exact_run, tmp_path):
    layout, mats = read_layout(exact_run.path)
    contribs = reference_contributions(exact_run, layout, mats)
    records = read_records(exact_run.path)
    until = 5
    out = dv_build.build_embeddings(exact_run.path, tmp_path / "ckpt.h5", until_step=until, dtype="float64", progress=False)
    got = emb_rows(out)
    expected = per_record(reference_embeddings(contribs, layout, exact_run.lr, "batch", until=until), records)
    early = records["step"] < until
    np.testing.assert_allclose(got[early], expected[early], rtol=1e-5, atol=1e-9)
    assert np.isnan(got[~early]).all()
    with h5py.File(out, "r", locking=False) as f:
        assert int(f.attrs["until_step"]) == until
        sums, ids = f["sums"][()], f["sample_ids"][()]
    for k, i in enumerate(ids):
        np.testing.assert_allclose(sums[k], expected[early & (records["sample_id"] == i)].sum(0), atol=1e-8)
    with pytest.raises(EmbeddingsError, match="until_step"):
        dv_build.build_embeddings(exact_run.path, tmp_path / "bad.h5", until_step=99, progress=False)
    with inrun.open_run(exact_run.path) as run:
        assert dv_build.default_embeddings_path(run, until).name == "run.dvemb.step5.h5"
        assert dv_build.default_embeddings_path(run).name == "run.dvemb.h5"


# ------------------------------------------------------------------------------------------------ queries


def test_trajectory_loo_matches_explicit_reference(exact_run, tmp_path):
    layout, mats = read_layout(exact_run.path)
    contribs = reference_contributions(exact_run, layout, mats)
    records = read_records(exact_run.path)
    emb = per_record(reference_embeddings(contribs, layout, exact_run.lr, "batch"), records)
    test_grads = project(per_sample_grads(exact_run.model, loss_fn, exact_run.test), layout, mats)  # [3, D]
    expected_rows = emb @ test_grads.T
    ids = np.unique(records["sample_id"])
    expected = np.stack([expected_rows[records["sample_id"] == i].sum(0) for i in ids])
    out = tmp_path / "e.h5"
    dv_build.build_embeddings(exact_run.path, out, dtype="float64", progress=False)
    with inrun.open_run(exact_run.path) as run:
        got = dv.trajectory_loo(run, exact_run.model, loss_fn, exact_run.test, embeddings=out)
        assert got.shape == (len(run.sample_ids), 3)
        np.testing.assert_array_equal(run.sample_ids, ids)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
        rows = dv.trajectory_loo(run, exact_run.model, loss_fn, exact_run.test, embeddings=out, per_occurrence=True)
        np.testing.assert_allclose(rows, expected_rows, rtol=1e-5, atol=1e-9)
        # a list of test batches concatenates their points
        split = [{k: v[:1] for k, v in exact_run.test.items()}, {k: v[1:] for k, v in exact_run.test.items()}]
        np.testing.assert_allclose(dv.trajectory_loo(run, exact_run.model, loss_fn, split, embeddings=out), got, rtol=1e-12)
        # the model's parameters and grads are untouched
        assert all(p.grad is None for p in exact_run.model.parameters())


def test_trajectory_loo_sign_and_size_against_retraining(tmp_path):
    """Small learning rate: the estimate tracks the retrained TSLOO in sign and size (positive = helped)."""
    lr = 0.05
    rec = record(tmp_path / "run.h5", lr=lr, embeddings={"k_rows": 8, "k_cols": 8})
    with torch.no_grad():
        base = float(loss_fn(rec.model, rec.test).mean())
    with inrun.open_run(rec.path) as run:
        predicted = dv.trajectory_loo(run, rec.model, loss_fn, rec.test, progress=False).mean(1)  # mean test loss
        ids = run.sample_ids
    assert (tmp_path / "run.dvemb.h5").exists()  # built on first use at the default path
    truth = []
    for i in ids.tolist():
        steps = {s for s, batch in enumerate(rec.order) if i in batch.tolist()}
        retrained = record(None, lr=lr, removal=(i, steps)).model
        with torch.no_grad():
            truth.append(float(loss_fn(retrained, rec.test).mean()) - base)
    truth = np.array(truth)
    assert np.corrcoef(predicted, truth)[0, 1] > 0.99
    big = np.abs(truth) > 0.2 * np.abs(truth).max()
    assert (np.sign(predicted[big]) == np.sign(truth[big])).all()
    np.testing.assert_allclose(predicted, truth, atol=0.1 * np.abs(truth).max())


def test_step_influence_matches_reference(projected_run, tmp_path):
    layout, mats = read_layout(projected_run.path)
    records = read_records(projected_run.path)
    with h5py.File(projected_run.path, "r", locking=False) as f:
        scales = f["steps/proj_scale"][()]
    emb = explicit_recursion(records, scales, layout)
    test = project(per_sample_grads(projected_run.model, loss_fn, projected_run.test), layout, mats).mean(0)
    expected = [np.mean(emb[records["step"] == s] @ test) / LR for s in range(len(projected_run.order))]
    out = dv_build.build_embeddings(projected_run.path, tmp_path / "e.h5", dtype="float64", progress=False)
    with inrun.open_run(projected_run.path) as run:
        steps, values = dv.step_influence(run, projected_run.model, loss_fn, projected_run.test, embeddings=out)
    np.testing.assert_array_equal(steps, np.arange(len(projected_run.order)))
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-10)


def test_multi_rank_run_equals_single_rank_union(tmp_path):
    """Two ranks, each recording half of every batch (gradients averaged as DDP does): the embeddings of the union
    batch, in Run.records() row order (rank 0's rows, then rank 1's)."""
    x, y, test = make_data()
    order = make_order()
    models = [make_model(), make_model()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    recorders = [InRunRecorder(m, tmp_path / "run.h5", val_data=test, loss_fn=loss_fn, shapley=None, rank=r,
                               world_size=2, run_id="shared", gradient_divisor=2.0, overwrite=True,
                               embeddings={"k_rows": 2, "k_cols": 3}) for r, m in enumerate(models)]
    for rec in recorders:
        rec.start()
    for ids in order:
        halves = (ids[: BATCH // 2], ids[BATCH // 2:])
        for model, rec, half in zip(models, recorders, halves):
            batch = {"x": x[half], "y": y[half], "index": half}
            rec.begin_microbatch(batch)
            loss_fn(model, batch).mean().backward()
            rec.end_microbatch()
        for p0, p1 in zip(models[0].parameters(), models[1].parameters()):  # all-reduce (mean)
            mean = (p0.grad + p1.grad) / 2
            p0.grad.copy_(mean)
            p1.grad.copy_(mean)
        for rec, opt in zip(recorders, optimizers):
            rec.before_optimizer_step(opt)
            opt.step()
            opt.zero_grad()
    for rec in recorders:
        rec.close()
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.world_size == 2
        out = dv_build.build_embeddings(run, dtype="float64", chunk_steps=3, progress=False)
        assert out == tmp_path / "run.dvemb.h5"
        got = emb_rows(out)
        rec0, rec1 = read_records(run.paths[0]), read_records(run.paths[1])
        merged = {k: np.concatenate([rec0[k], rec1[k]]) for k in rec0}
        layout, _ = read_layout(run.paths[0])
        with h5py.File(run.paths[0], "r", locking=False) as f:  # the open Run reads without HDF5 locks
            scales = f["steps/proj_scale"][()]
        np.testing.assert_allclose(got, explicit_recursion(merged, scales, layout), rtol=1e-6, atol=1e-10)
        np.testing.assert_array_equal(run.records(["sample_id"])["sample_id"], merged["sample_id"])
        scores = dv.trajectory_loo(run, models[0], loss_fn, test)
        assert scores.shape == (N_TRAIN, 3) and np.isfinite(scores).all()


# ------------------------------------------------------------------------------------------------ errors


def test_run_without_embeddings_is_refused(tmp_path):
    rec = record(None)
    path = tmp_path / "plain.h5"
    recorder = InRunRecorder(make_model(), path, val_data=rec.test, loss_fn=loss_fn, shapley="first")
    recorder.start()
    model = recorder.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"x": rec.x[:6], "y": rec.y[:6], "index": torch.arange(6)}
    recorder.begin_microbatch(batch)
    loss_fn(model, batch).mean().backward()
    recorder.end_microbatch()
    recorder.before_optimizer_step(opt)
    opt.step()
    recorder.close()
    with inrun.open_run(path) as run:
        with pytest.raises(EmbeddingsError, match="without embeddings.*embeddings=True"):
            dv.trajectory_loo(run, model, loss_fn, rec.test)
        with pytest.raises(EmbeddingsError, match="without embeddings"):
            dv_build.build_embeddings(run, progress=False)


def test_mismatched_model_is_named(projected_run, tmp_path):
    out = dv_build.build_embeddings(projected_run.path, tmp_path / "e.h5", progress=False)
    with inrun.open_run(projected_run.path) as run:
        with pytest.raises(EmbeddingsError, match=r"parameter '[02]\.weight' has shape \((7, 4|3, 7)\)"):
            dv.trajectory_loo(run, make_model(hidden=7), loss_fn, projected_run.test, embeddings=out)
        renamed = nn.Sequential()
        renamed.add_module("first", nn.Linear(N_IN, N_HIDDEN))
        renamed.add_module("act", nn.Tanh())
        renamed.add_module("last", nn.Linear(N_HIDDEN, N_OUT))
        with pytest.raises(EmbeddingsError, match=r"no attributed parameter '.\.weight'"):
            dv.trajectory_loo(run, renamed.to(DTYPE), loss_fn, projected_run.test, embeddings=out)


def test_embeddings_of_another_run_or_schema_are_refused(projected_run, exact_run, tmp_path):
    other = dv_build.build_embeddings(exact_run.path, tmp_path / "other.h5", progress=False)
    with inrun.open_run(projected_run.path) as run:
        with pytest.raises(EmbeddingsError, match="belongs to run"):
            dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, embeddings=other)
        with pytest.raises(EmbeddingsError, match="no embeddings file"):
            dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, embeddings=tmp_path / "missing.h5")
    newer = tmp_path / "newer.h5"
    shutil.copy(dv_build.build_embeddings(projected_run.path, tmp_path / "mine.h5", progress=False), newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = dv_build.SCHEMA_VERSION + 1
    with inrun.open_run(projected_run.path) as run:
        with pytest.raises(EmbeddingsError, match="upgrade inrun"):
            dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, embeddings=newer)
    # a run store written by a newer schema is refused when opened
    store = tmp_path / "newer-store.h5"
    shutil.copy(projected_run.path, store)
    with h5py.File(store, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(Exception, match="upgrade inrun"):
        dv_build.build_embeddings(store, progress=False)


def test_embeddings_of_a_run_that_went_on_are_refused(tmp_path):
    rec = record(tmp_path / "run.h5", embeddings={"k_rows": 2, "k_cols": 3})
    out = dv_build.build_embeddings(rec.path, progress=False)
    # append one more step to the store, as a resumed training would
    from inrun.store.writer import RunWriter

    with h5py.File(rec.path, "r", locking=False) as f:
        row = f["records/proj_grad"][:1]
        run_id = str(f.attrs["run_id"])
    with RunWriter(rec.path, resume=True, run_id=run_id) as writer:
        writer.append_step({"step": 8, "lr": LR, "proj_scale": np.full(4, LR)},
                           {"sample_id": np.array([0]), "proj_grad": row})
    with inrun.open_run(rec.path) as run:
        with pytest.raises(EmbeddingsError, match="went on after the build"):
            dv.trajectory_loo(run, rec.model, loss_fn, rec.test, embeddings=out)


def test_unrecorded_steps_stay_nan(tmp_path):
    """settings.every = 2: odd steps carry NaN projections; their embeddings are NaN and they add nothing to M."""
    rec = record(tmp_path / "run.h5", embeddings={"k_rows": 2, "k_cols": 3, "every": 2})
    records = read_records(rec.path)
    odd = records["step"] % 2 == 1
    assert np.isnan(records["proj_grad"][odd]).all()
    out = dv_build.build_embeddings(rec.path, dtype="float64", progress=False)
    got = emb_rows(out)
    assert np.isnan(got[odd]).all() and np.isfinite(got[~odd]).all()
    layout, _ = read_layout(rec.path)
    with h5py.File(rec.path, "r", locking=False) as f:
        scales = f["steps/proj_scale"][()]
    even = {k: v[~odd] for k, v in records.items()}
    expected = explicit_recursion(even, np.nan_to_num(scales), layout)
    np.testing.assert_allclose(got[~odd], expected, rtol=1e-6, atol=1e-10)
    with h5py.File(out, "r", locking=False) as f:
        ids, occurrences = f["sample_ids"][()], f["occurrences"][()]
    expected_counts = [int((even["sample_id"] == i).sum()) for i in ids]  # recorded (even-step) occurrences only
    np.testing.assert_array_equal(occurrences, expected_counts)


def test_bad_arguments(projected_run, tmp_path):
    with pytest.raises(ValueError, match="hessian_scale"):
        dv_build.build_embeddings(projected_run.path, tmp_path / "x.h5", hessian_scale="mean", progress=False)
    with pytest.raises(ValueError, match="chunk_steps"):
        dv_build.build_embeddings(projected_run.path, tmp_path / "x.h5", chunk_steps=0, progress=False)


def test_stale_default_embeddings_of_an_earlier_run_are_rebuilt(projected_run, exact_run, tmp_path):
    """A store recorded again at the same path (overwrite=True) leaves the earlier run's embeddings at the default
    path: reading with the default rebuilds them for this run (with a warning) instead of refusing, and the values
    equal those from embeddings built explicitly for this run (a file of another run passed explicitly stays refused:
    test_embeddings_of_another_run_or_schema_are_refused)."""
    store = tmp_path / "run.h5"
    shutil.copy(projected_run.path, store)
    with inrun.open_run(store) as run:
        default = dv.default_embeddings_path(run)
    dv_build.build_embeddings(exact_run.path, default, progress=False)  # the "earlier run" at this path
    mine = dv_build.build_embeddings(projected_run.path, tmp_path / "mine.h5", progress=False)
    with inrun.open_run(store) as run:
        with pytest.warns(UserWarning, match="embeddings of an earlier run"):
            got = dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, progress=False)
        expected = dv.trajectory_loo(run, projected_run.model, loss_fn, projected_run.test, embeddings=mine)
        with h5py.File(default, "r") as f:
            assert str(f.attrs["run_id"]) == run.run_id
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
