"""Shared test set-up: make the repository root importable (for ``experiments``), keep W&B offline."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _small_tensor_settings():
    """The tests' tensors are tiny: intra-op threads only add synchronisation (10-50x slower on a busy 2-core
    machine), and oneDNN builds a kernel for every new input shape. Subprocess scripts set the same themselves."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn
