"""Wall-clock timing (a warm-up, then timed repetitions) and peak memory of one stage (from a further call).

CPU: the peak of the process's resident set, sampled by a thread every few milliseconds, minus the resident set
just before the repetition (glibc must return freed blocks to the system for this to see each repetition on its
own; the runner fixes ``MALLOC_MMAP_THRESHOLD_`` for that). GPU: the allocator's peak minus what was in use
before (torch: ``max_memory_allocated`` after a reset; JAX: ``peak_bytes_in_use``, which cannot be reset, so a
stage whose peak stays under an earlier stage's shows the earlier high-water mark's excess only, a lower bound).
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

MB = 1 << 20


def log(message: str) -> None:
    """A progress line on stderr, stamped with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class RssSampler:
    """Highest resident set size seen while active (a background thread polls ``/proc``)."""

    def __init__(self, interval: float = 0.003):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / MB


class Memory:
    """Peak-memory probe for one framework on one device: ``with probe.track() as t: ...; t.delta_mb``."""

    def __init__(self, framework: str, device: str):
        self.framework, self.device = framework, device

    def track(self):
        if self.device == "cpu":
            return RssSampler()
        return _TorchCuda() if self.framework == "torch" else _JaxDevice()


class _TorchCuda:
    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.delta_mb = (torch.cuda.max_memory_allocated() - self.start) / MB


class _JaxDevice:
    def _stats(self) -> dict:
        import jax

        return jax.local_devices()[0].memory_stats() or {}

    def __enter__(self):
        self.start = self._stats().get("bytes_in_use", 0)
        return self

    def __exit__(self, *exc):
        self.delta_mb = max(0, self._stats().get("peak_bytes_in_use", 0) - self.start) / MB


@dataclass
class Measured:
    """Seconds of each timed repetition, the largest peak-memory excess, and the last repetition's output."""

    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    output: Any = None
    warmup_s: float = 0.0  # the first call: includes JAX's compilation
    calls_per_rep: int = 1  # calls averaged in each repetition (fast stages)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Job:
    """One stage of one framework: ``run(setup())`` is timed, ``sync(output)`` waits for the device inside the
    timed region (block_until_ready / cuda synchronize); ``setup`` is never timed."""

    run: Callable[[Any], Any]
    sync: Callable[[Any], Any]
    memory: Memory
    setup: Callable[[], Any] = lambda: None


MIN_REP_S = 0.05  # a repetition of a faster stage runs it several times and records the mean


def _seconds(job: Job, calls: int = 1) -> tuple[float, Any]:
    """Mean seconds of ``calls`` calls (``setup`` before each, untimed) and the last call's output."""
    total, out = 0.0, None
    for _ in range(calls):
        state = job.setup()
        t0 = time.perf_counter()
        out = job.sync(job.run(state))
        total += time.perf_counter() - t0
    return total / calls, out


def _peak_mb(job: Job) -> float:
    """Peak-memory excess of one further call (untimed: the probe's polling would slow a fast stage)."""
    state = job.setup()
    with job.memory.track() as mem:
        job.sync(job.run(state))
    return mem.delta_mb


def measure_jobs(jobs: list[Job], reps: int, warmup: int = 1) -> list[Measured]:
    """Each job ``warmup`` times untimed, then ``reps`` timed rounds in which every job runs once in turn (on a
    machine whose load drifts, the jobs being compared see the same conditions), then one call each for the
    peak memory. A job faster than ``MIN_REP_S`` runs ``ceil(MIN_REP_S / t)`` times per repetition (at most 1000,
    ``t`` from one calibration call), so that sub-millisecond stages are not timer and scheduler noise."""
    results = [Measured() for _ in jobs]
    for _ in range(warmup):
        for job, res in zip(jobs, results):
            res.warmup_s += _seconds(job)[0]
    calls = [min(1000, max(1, math.ceil(MIN_REP_S / max(_seconds(job)[0], 1e-6)))) for job in jobs]
    for _ in range(reps):
        for job, res, n in zip(jobs, results, calls):
            seconds, res.output = _seconds(job, n)
            res.seconds.append(seconds)
    for job, res, n in zip(jobs, results, calls):
        res.peak_mb, res.calls_per_rep = _peak_mb(job), n
    return results


def measure(run: Callable[[Any], Any], sync: Callable[[Any], Any], memory: Memory, reps: int,
            setup: Callable[[], Any] = lambda: None, warmup: int = 1) -> Measured:
    """One job alone: see :func:`measure_jobs`."""
    return measure_jobs([Job(run, sync, memory, setup)], reps, warmup)[0]
