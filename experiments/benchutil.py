"""Shared helpers for the benchmarks in ``experiments/``: timing, peak memory, and plain-text tables.

Timing (:func:`time_runs`): ``repeats`` timed calls after optional warm-up calls; the device is synchronised before
and after each call so that CUDA work is counted; report the median wall-clock time, and the median CPU time of the
process (``time.process_time``, all threads). On a CPU shared with other jobs the CPU time is the steadier of the two
(it does not count time the process waited for a core), though it also counts threads spinning while they wait. :func:`measure` combines both: one call for
peak memory (which also warms up), then the timed calls.

Peak memory (:func:`peak_memory`), measured in a separate call from the timed ones so that sampling never slows a
timing down:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated just before
  the call. Exact for memory allocated through PyTorch's CUDA allocator; the allocator's cache and the CUDA context are
  not counted.
* CPU: PyTorch's CPU allocations are invisible to ``tracemalloc``, so a background thread reads the process's
  resident set size (RSS, ``/proc/self/statm``) about every millisecond while the call runs, and the peak RSS minus the
  RSS just before the call is reported. Limits: a spike shorter than the sampling interval can be missed; memory the C
  allocator keeps after ``free`` (rather than returning it to the OS) is reused without raising RSS, so we
  ``malloc_trim`` before each measurement to start from a low baseline; memory that is allocated but never written is
  not resident and not counted; anything else the process does at the same time (other threads, Python objects) is
  counted. Treat CPU numbers as good to a few MiB, not exact. Linux only (elsewhere they are reported as ``None``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Measurement:
    """Timing and peak memory of one benchmarked call."""

    seconds: float  # median wall-clock time over the timed repeats
    cpu_seconds: float  # median CPU time of this process (all threads) over the same repeats
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "times": self.times, "peak_bytes": self.peak_bytes}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> None:
    """Ask glibc to return freed heap memory to the OS (no-op where glibc is not available)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand cached memory back, so that the next measurement starts from a clean state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc_trim()


def rss_bytes() -> int | None:
    """The current resident set size of this process in bytes (None if ``/proc`` is not available)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except OSError:
        return None


class RssPeakSampler:
    """Context manager sampling the process RSS in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssPeakSampler":
        self.peak = rss_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """Run ``fn`` once; return its result and the extra memory it needed at its peak (bytes), see module docstring."""
    release_memory(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    before = rss_bytes()
    if before is None:
        return fn(), None
    with RssPeakSampler() as sampler:
        result = fn()
    return result, sampler.peak - before


def time_runs(
    fn: Callable[[], Any], device: torch.device, *, repeats: int = 3, warmup: int = 0
) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (gc before each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def measure(fn: Callable[[], Any], device: torch.device, *, repeats: int = 3, warmup: int = 0) -> Measurement:
    """Peak memory of one call, then the median time of ``repeats`` more calls.

    The memory call comes first and doubles as the warm-up of the timed calls; add ``warmup`` calls before it when
    ``fn`` has never run in this process (lazy initialisation would otherwise count as memory).
    """
    for _ in range(warmup):
        fn()
    _, peak = peak_memory(fn, device)
    times = time_runs(fn, device, repeats=repeats)
    release_memory(device)
    walls = [wall for wall, _ in times]
    return Measurement(statistics.median(walls), statistics.median(cpu for _, cpu in times), walls, peak)


def available_memory_bytes(device: torch.device) -> int:
    """Memory that a new allocation could still use: free GPU memory, or ``MemAvailable`` on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse anything


def format_bytes(count: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with columns right-aligned to their widest cell; short rows are padded with blanks."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] + [""] * (len(headers) - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Any, Any], torch.Tensor],
               batch: Any, recorder: Any = None) -> torch.Tensor:
    """One plain-PyTorch optimizer step on ``batch`` (mean of the per-sample losses), driving ``recorder`` (an
    ``InRunRecorder``, or None for plain training) the way a user's loop does: the batch's ids before the forward,
    the micro-batch after the backward, the values before ``optimizer.step()``, the training loss after. Returns
    the loss (detached)."""
    if recorder is not None:
        recorder.begin_microbatch(batch)
    loss = loss_fn(model, batch).mean()
    loss.backward()
    if recorder is not None:
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if recorder is not None:
        recorder.note_train_loss(float(loss.detach()))
    return loss.detach()
