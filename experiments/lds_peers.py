"""Peer attribution methods (dattri, kronfluence) on the LDS benchmark's own trajectory, side by side with inrun.

Every function here takes one :class:`PeerInputs` (the model, the training and test data, the model at the start of
every step with that step's learning rate and batch, all read back from an inrun recording with
``checkpoint_every=1``) and returns the ``[n_train, n_test]`` value matrix with the sign convention of
``experiments/lds.py``: positive = the training sample reduced the test point's loss. The peers value the very
trajectory inrun recorded; nothing is trained again.

Methods (each through its library's public API):

* ``dattri TracIn``: ``TracInAttributor`` over the checkpoint of every step, weighted by that step's learning rate,
  gradients unprojected (``proj_type="identity"``): ``sum_t lr_t <grad loss_i(theta_t), grad loss_test(theta_t)>``.
* ``dattri LiSSA IF``: ``IFAttributorLiSSA`` at the final model, the inverse-Hessian estimated on the whole training
  set with batches of 32, depth 1000, scaling 50, damping 0.01 (chosen by this benchmark from batch 1/32, depth
  300/1000, damping 0.001/0.01/0.1). dattri's defaults (batch 1, depth 5000, no damping) diverge here: the final
  models' training-loss Hessians have eigenvalues down to -0.12 (SGD) / -0.16 (AdamW), so each undamped step grows
  that direction by 1 + 0.12/50 and 5000 steps by ~2e5 (LDS .03 / .11); ``options["lissa"]`` overrides.
* ``dattri EK-FAC IF``: ``IFAttributorEKFAC`` at the final model on every Linear layer. dattri's default damping 0
  divides by zero here (input pixels that are 0 in every image give zero eigenvalues: every score is NaN), so the
  damping is kronfluence's heuristic, 0.1 x the mean corrected eigenvalue (over all layers: dattri takes one
  number); ``--peer-damping`` adds fixed values.
* ``dattri DVEmb``: ``DVEmbAttributor`` (data value embeddings, unfactored, unprojected) fed each step's batch,
  per-sample gradients at that step's checkpoint and learning rate, scored with the final model's test gradients.
* ``kronfluence EK-FAC``: ``Analyzer`` with a classification ``Task`` (true Fisher by sampled labels, the test loss
  as measurement), EK-FAC factors at the final model, heuristic damping (``damping_factor=None``: 0.1 x the mean
  eigenvalue); ``--peer-damping`` adds fixed values (``damping_factor``) as further rows.

A peer whose package is missing is skipped with one printed line; a peer that fails is reported with its error and the
benchmark goes on (:func:`run_peers`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import math
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class PeerInputs:
    """What every peer needs, in the benchmark's own terms.

    ``checkpoints[t]``: the model's state at the start of step ``t`` (t = 0..T-1); ``lrs[t]`` and ``step_ids[t]``: that
    step's learning rate and training ids (indices into ``train``); ``final_state``: the trained model. ``train`` and
    ``test`` are dicts with ``x`` (float features) and ``y`` (class labels); ``steps_per_epoch`` groups steps into
    epochs (DVEmb keeps one embedding per epoch).
    """

    model: nn.Module
    train: dict
    test: dict
    checkpoints: list[dict[str, torch.Tensor]]
    lrs: np.ndarray
    step_ids: list[torch.Tensor]
    final_state: dict[str, torch.Tensor]
    steps_per_epoch: int
    options: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.train["y"])

    @property
    def n_test(self) -> int:
        return len(self.test["y"])


def inputs_from_run(run, model: nn.Module, train: dict, test: dict, step_ids: list[torch.Tensor],
                    steps_per_epoch: int, **options) -> PeerInputs:
    """:class:`PeerInputs` from an open inrun run recorded with ``checkpoint_every=1``: its checkpoints, its steps'
    learning rates, and ``step_ids`` (the ids of each step's batch, in order; ``experiments.lds.batches``).
    ``model`` holds the final parameters."""
    from inrun.store.paths import find_checkpoints

    found = find_checkpoints(run)
    steps = run.steps
    numbers = np.asarray(steps["step"], np.int64)
    n_steps = len(step_ids)
    missing = [t for t in range(n_steps) if t not in found]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"run {run.paths[0]} lacks the checkpoints of steps {missing[:5]}{more} ({len(found)} found "
                         f"for {n_steps} steps); record with checkpoint_every=1")
    if "lr" not in steps:
        raise ValueError(f"run {run.paths[0]} has no learning rates in its steps table")
    lr_of = dict(zip(numbers.tolist(), np.asarray(steps["lr"], np.float64).tolist()))
    lrs = np.array([lr_of[t] for t in range(n_steps)])
    checkpoints = []
    for t in range(n_steps):
        payload = torch.load(found[t], map_location="cpu", weights_only=True)
        if payload.get("run_id") != run.run_id:
            raise ValueError(f"checkpoint {found[t]} belongs to run {payload.get('run_id')}, not {run.run_id}")
        checkpoints.append(payload["state_dict"])
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return PeerInputs(model=model, train=train, test=test, checkpoints=checkpoints, lrs=lrs, step_ids=list(step_ids),
                      final_state=final_state, steps_per_epoch=steps_per_epoch, options=dict(options))


# ------------------------------------------------------------------------------------------------------ helpers


def _fresh_model(inputs: PeerInputs, state: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(inputs.model)
    model.load_state_dict(state)
    model.eval()
    return model


def _dataset(data: dict) -> TensorDataset:
    return TensorDataset(data["x"].float(), data["y"].long())


def _loader(data: dict, batch_size: int) -> DataLoader:
    return DataLoader(_dataset(data), batch_size=batch_size, shuffle=False)


def dattri_loss(model: nn.Module) -> Callable:
    """dattri's functional loss ``f(params, (x, y))``: mean cross-entropy. It accepts one sample without a batch
    dimension (TracIn's vmap), one with a batch dimension of 1 (the IF attributors) and whole batches (EK-FAC's
    covariances, LiSSA's sampled batches, whose labels dattri casts to float)."""

    def f(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
        return F.cross_entropy(logits, y.reshape(-1).long())

    return f


def _task(inputs: PeerInputs, checkpoints):
    from dattri.task import AttributionTask

    model = _fresh_model(inputs, inputs.final_state)
    return AttributionTask(loss_func=dattri_loss(model), model=model, checkpoints=checkpoints)


def _matrix(scores: torch.Tensor, inputs: PeerInputs) -> np.ndarray:
    out = scores.detach().double().cpu().numpy()
    if out.shape != (inputs.n_train, inputs.n_test):
        raise RuntimeError(f"peer returned shape {out.shape}, expected {(inputs.n_train, inputs.n_test)}")
    return out


# ------------------------------------------------------------------------------------------------------ peers


def dattri_tracin(inputs: PeerInputs) -> np.ndarray:
    """dattri TracIn over the checkpoint of every step, each weighted by its step's learning rate (unprojected)."""
    from dattri.algorithm import TracInAttributor

    task = _task(inputs, list(inputs.checkpoints))
    projector = {"proj_type": "identity", "proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0,
                 "device": "cpu"}  # a full dict: dattri updates its module-level defaults in place
    attributor = TracInAttributor(task=task, weight_list=torch.tensor(inputs.lrs, dtype=torch.float32),
                                  normalized_grad=False, projector_kwargs=projector, device="cpu")
    scores = attributor.attribute(_loader(inputs.train, 250), _loader(inputs.test, inputs.n_test))
    return _matrix(scores, inputs)


def dattri_lissa(inputs: PeerInputs) -> np.ndarray:
    """dattri's LiSSA influence function at the final model (positive = upweighting the sample lowers the test
    loss). The full-training loader is one batch: dattri runs the LiSSA recursion once per loader batch."""
    from dattri.algorithm import IFAttributorLiSSA

    torch.manual_seed(inputs.options.get("seed", 0))
    options = {"batch_size": 32, "num_repeat": 1, "recursion_depth": 1000, "damping": 0.01, "scaling": 50.0}
    options.update(inputs.options.get("lissa", {}))
    attributor = IFAttributorLiSSA(task=_task(inputs, inputs.final_state), device="cpu", **options)
    attributor.cache(_loader(inputs.train, inputs.n_train))
    scores = attributor.attribute(_loader(inputs.train, inputs.n_train), _loader(inputs.test, inputs.n_test))
    return _matrix(scores, inputs)


def dattri_ekfac(inputs: PeerInputs) -> np.ndarray:
    """dattri's EK-FAC influence function at the final model, every Linear layer; damping ``options["damping"]`` or,
    when that is None, 0.1 x the mean of the cached corrected eigenvalues (kronfluence's heuristic)."""
    from dattri.algorithm import IFAttributorEKFAC

    torch.manual_seed(inputs.options.get("seed", 0))
    damping = inputs.options.get("damping")
    attributor = IFAttributorEKFAC(task=_task(inputs, inputs.final_state), device="cpu",
                                   damping=0.0 if damping is None else float(damping))
    attributor.cache(_loader(inputs.train, 100))
    if damping is None:
        lambdas = torch.cat([v.reshape(-1) for v in attributor.cached_lambdas.values()])
        attributor.damping = 0.1 * float(lambdas.mean())
    scores = attributor.attribute(_loader(inputs.train, inputs.n_train), _loader(inputs.test, inputs.n_test))
    return _matrix(scores, inputs)


def dattri_dvemb(inputs: PeerInputs) -> np.ndarray:
    """dattri's data value embeddings, fed the recorded trajectory step by step: the model set to step ``t``'s
    checkpoint, then ``cache_gradients(epoch, batch, ids, lr_t)``; scored with the final model's test gradients."""
    from dattri.algorithm import DVEmbAttributor

    task = _task(inputs, inputs.final_state)
    attributor = DVEmbAttributor(task=task)
    model = task.get_model()
    for t, (state, ids) in enumerate(zip(inputs.checkpoints, inputs.step_ids)):
        model.load_state_dict(state)
        attributor.cache_gradients(t // inputs.steps_per_epoch, (inputs.train["x"][ids].float(),
                                                                  inputs.train["y"][ids].long()),
                                   ids, float(inputs.lrs[t]))
    attributor.cache()
    model.load_state_dict(inputs.final_state)
    scores = attributor.attribute(_loader(inputs.test, inputs.n_test))
    out = np.zeros((inputs.n_train, inputs.n_test))
    found = scores.detach().double().cpu().numpy()
    out[: found.shape[0]] = found  # rows up to the largest id seen
    return out


def kronfluence_ekfac(inputs: PeerInputs) -> np.ndarray:
    """kronfluence's EK-FAC influence at the final model: true Fisher (sampled labels), the test loss as the
    measurement, heuristic damping (``damping_factor=None``) unless ``options["damping"]`` is set."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    torch.manual_seed(inputs.options.get("seed", 0))
    task = Classification()
    model = prepare_model(_fresh_model(inputs, inputs.final_state), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(analysis_name="lds", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=folder)
        analyzer.fit_all_factors(factors_name="ekfac", dataset=_dataset(inputs.train), per_device_batch_size=100,
                                 factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=_dataset(inputs.test),
            train_dataset=_dataset(inputs.train), per_device_query_batch_size=inputs.n_test,
            per_device_train_batch_size=inputs.n_train,
            score_args=ScoreArguments(damping_factor=inputs.options.get("damping")),
            overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # [n_test, n_train]
    return _matrix(scores.T, inputs)


# ------------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Peer:
    key: str  # the --peers name
    label: str  # the table row
    package: str
    fn: Callable[[PeerInputs], np.ndarray]
    damped: bool = False  # takes options["damping"] (None: the peer's heuristic); run at every value of dampings

    def row(self, damping: float | None) -> str:
        if not self.damped:
            return self.label
        return f"{self.label[:-1]}, {'heuristic damping' if damping is None else f'damping {damping:g}'})"


PEERS = [
    Peer("dattri-tracin", "dattri TracIn (every-step checkpoints, x lr)", "dattri", dattri_tracin),
    Peer("dattri-lissa", "dattri LiSSA IF (final model, damping 0.01)", "dattri", dattri_lissa),
    Peer("dattri-ekfac", "dattri EK-FAC IF (final model)", "dattri", dattri_ekfac, damped=True),
    Peer("dattri-dvemb", "dattri DVEmb (every-step checkpoints)", "dattri", dattri_dvemb),
    Peer("kronfluence-ekfac", "kronfluence EK-FAC (final model)", "kronfluence", kronfluence_ekfac, damped=True),
]
PEER_KEYS = [p.key for p in PEERS]


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a package blocked or half-imported (sys.modules[name] = None)
        return False


def select(names: list[str] | None) -> list[Peer]:
    """The peers named (``None`` or ``["all"]``: every peer; ``["none"]``: none), checked against :data:`PEERS`."""
    if not names or names == ["all"]:
        return list(PEERS)
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PEER_KEYS]
    if unknown:
        raise ValueError(f"--peers: unknown peer(s) {unknown}; choose from {PEER_KEYS}, 'all' or 'none'")
    return [p for p in PEERS if p.key in names]


def run_peers(inputs: PeerInputs, peers: list[Peer], log: Callable[[str], None] = print,
              dampings: list[float | None] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each peer's matrix ``{row: [n_train, n_test]}``, and ``{row: error}`` for those that failed. A peer whose
    package is absent is skipped with one line; a failing one is logged with its error (never raised). A damped peer
    runs once per value of ``dampings`` (default ``[None]``: its heuristic), one row each."""
    values, failures, skipped = {}, {}, set()
    for peer in peers:
        if not installed(peer.package):
            if peer.package not in skipped:
                log(f"{peer.package} not installed: skipped")
                skipped.add(peer.package)
            continue
        for damping in (dampings or [None]) if peer.damped else [None]:
            row = peer.row(damping)
            run_inputs = replace(inputs, options={**inputs.options, "damping": damping}) if peer.damped else inputs
            start = time.perf_counter()
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # the peers' progress bars
                    matrix = peer.fn(run_inputs)
                if not np.all(np.isfinite(matrix)):
                    raise FloatingPointError(f"{int((~np.isfinite(matrix)).sum())} non-finite values")
            except Exception as error:  # noqa: BLE001 - a peer's failure is a result to report, not a crash
                message = f"{type(error).__name__}: {error}"
                failures[row] = message
                log(f"{row}: failed ({message})")
                if inputs.options.get("traceback"):
                    log(traceback.format_exc())
                continue
            values[row] = matrix
            log(f"{row}: {time.perf_counter() - start:.1f} s")
    return values, failures


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0
