"""The LDS benchmark's peer wiring (experiments/lds_peers.py).

dattri TracIn, fed the checkpoints and learning rates read back from an inrun recording, must equal an explicit
reference computed here from a separately trained copy of the same trajectory: the sum over steps of
``lr_t * <grad loss_i(theta_t), grad loss_test(theta_t)>`` with per-sample gradients from ``torch.autograd.grad``.
That checks the checkpoint order, the learning-rate mapping (a schedule makes every step's rate different) and the
sign. The registry's skip and failure reporting is checked without any peer package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments import lds, lds_peers
from inrun.valuation.recorder import InRunRecorder


def _setting() -> lds.Settings:
    return lds.Settings(optimizer="sgd", lr=0.1, n_train=60, test_points=5, epochs=1, batch=16, subsets=2)


def _lr(t: int) -> float:
    return 0.1 * (1.0 + 0.5 * t)  # a different rate at every step


def _train(s, train, test, path=None):
    """The benchmark's trajectory with a learning-rate schedule; recorded with checkpoints at every step when
    ``path`` is given. Returns the final model and the states at the start of each step."""
    model = lds.make_model(s)
    optimizer = torch.optim.SGD(model.parameters(), lr=_lr(0))
    recorder = None
    if path is not None:
        recorder = InRunRecorder(model, path, val_data=test, loss_fn=lds.loss_fn, checkpoint_every=1, overwrite=True)
        recorder.start()
    states = []
    for t, ids in enumerate(lds.batches(s)):
        for group in optimizer.param_groups:
            group["lr"] = _lr(t)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        batch = lds.take(train, ids)
        if recorder is not None:
            recorder.begin_microbatch(batch)
        loss = lds.loss_fn(model, batch).mean()
        loss.backward()
        if recorder is not None:
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    if recorder is not None:
        recorder.close()
    return model, states


def _reference_tracin(s, train, test, states) -> np.ndarray:
    """sum_t lr_t <grad loss_i(theta_t), grad loss_j(theta_t)>, one torch.autograd.grad call per sample."""
    model = lds.make_model(s)
    params = list(model.parameters())

    def grads(data):
        rows = []
        for k in range(len(data["y"])):
            loss = torch.nn.functional.cross_entropy(model(data["x"][k: k + 1]), data["y"][k: k + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
        return torch.stack(rows)

    total = torch.zeros(s.n_train, len(test["y"]), dtype=torch.float64)
    for t, state in enumerate(states):
        model.load_state_dict(state)
        total += _lr(t) * grads(train) @ grads(test).T
    return total.numpy()


def test_dattri_tracin_matches_explicit_reference(tmp_path):
    pytest.importorskip("dattri")
    torch.set_num_threads(1)
    s = _setting()
    train, test = lds.load_digits_split(s)
    model, _ = _train(s, train, test, tmp_path / "run.h5")
    _, states = _train(s, train, test)  # the same trajectory again, without the recorder
    import inrun

    with inrun.open_run(tmp_path / "run.h5") as run:
        inputs = lds_peers.inputs_from_run(run, model, train, test, list(lds.batches(s)), lds.steps_per_epoch(s))
    assert len(inputs.checkpoints) == len(states) == 4
    np.testing.assert_allclose(inputs.lrs, [_lr(t) for t in range(4)], rtol=1e-12)
    found = lds_peers.dattri_tracin(inputs)
    expected = _reference_tracin(s, train, test, states)
    assert found.shape == (s.n_train, s.test_points)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5 * scale)
    # a sample that shares its test point's label mostly helps: the sign convention (positive = helped)
    same = (train["y"][:, None] == test["y"][None, :]).numpy()
    assert found[same].mean() > 0 > found[~same].mean()


def test_missing_checkpoints_are_named(tmp_path):
    s = _setting()
    train, test = lds.load_digits_split(s)
    model = lds.make_model(s)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = InRunRecorder(model, tmp_path / "run.h5", val_data=test, loss_fn=lds.loss_fn, overwrite=True)
    recorder.start()
    batch = lds.take(train, torch.arange(8))
    recorder.begin_microbatch(batch)
    lds.loss_fn(model, batch).mean().backward()
    recorder.end_microbatch()
    recorder.before_optimizer_step(optimizer)
    optimizer.step()
    recorder.close()
    import inrun

    with inrun.open_run(tmp_path / "run.h5") as run, pytest.raises(ValueError, match="checkpoint_every=1"):
        lds_peers.inputs_from_run(run, model, train, test, list(lds.batches(s)), lds.steps_per_epoch(s))


def test_run_peers_skips_absent_packages_and_reports_failures():
    def broken(inputs):
        raise RuntimeError("boom")

    def ones(inputs):
        return np.ones((3, 2))

    inputs = lds_peers.PeerInputs(model=torch.nn.Linear(2, 2), train={"y": torch.zeros(3)}, test={"y": torch.zeros(2)},
                                  checkpoints=[], lrs=np.zeros(0), step_ids=[], final_state={}, steps_per_epoch=1)
    peers = [lds_peers.Peer("a", "absent one", "no_such_package_for_inrun_tests", ones),
             lds_peers.Peer("b", "absent two", "no_such_package_for_inrun_tests", ones),
             lds_peers.Peer("c", "broken", "numpy", broken),
             lds_peers.Peer("d", "fine", "numpy", ones)]
    lines = []
    values, failures = lds_peers.run_peers(inputs, peers, log=lines.append)
    assert list(values) == ["fine"] and values["fine"].shape == (3, 2)
    assert failures == {"broken": "RuntimeError: boom"}
    assert lines.count("no_such_package_for_inrun_tests not installed: skipped") == 1
    assert any(line.startswith("broken: failed (RuntimeError: boom)") for line in lines)


def test_damped_peers_run_once_per_damping():
    seen = []

    def record(inputs):
        seen.append(inputs.options["damping"])
        return np.zeros((3, 2))

    inputs = lds_peers.PeerInputs(model=torch.nn.Linear(2, 2), train={"y": torch.zeros(3)}, test={"y": torch.zeros(2)},
                                  checkpoints=[], lrs=np.zeros(0), step_ids=[], final_state={}, steps_per_epoch=1,
                                  options={"seed": 3})
    peer = lds_peers.Peer("e", "ekfac (final model)", "numpy", record, damped=True)
    values, _ = lds_peers.run_peers(inputs, [peer], log=lambda line: None, dampings=[None, 0.1])
    assert seen == [None, 0.1] and inputs.options == {"seed": 3}
    assert list(values) == ["ekfac (final model, heuristic damping)", "ekfac (final model, damping 0.1)"]


def test_select_names_peers():
    assert [p.key for p in lds_peers.select(None)] == lds_peers.PEER_KEYS
    assert lds_peers.select(["none"]) == []
    assert [p.key for p in lds_peers.select(["dattri-tracin"])] == ["dattri-tracin"]
    with pytest.raises(ValueError, match="unknown peer"):
        lds_peers.select(["dattri-trak"])
