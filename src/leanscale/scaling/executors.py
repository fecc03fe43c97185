"""Where the runs of a sweep train: in this process, in worker processes, or on Ray.

Each executor is ``run(todo, tokens, config, record)``: it trains every :class:`RunSpec` of
``todo`` on the corpus' token ids ``tokens`` and calls ``record(spec, result)`` in this process
as each run finishes (in any order). :data:`_EXECUTORS` maps ``SweepConfig.executor`` to them.

* ``"serial"`` (:func:`_run_serial`): one run after the other, on one shared train/validation
  split; under ``torchrun`` every rank trains each run with DDP. Its ``train`` argument is the
  function that trains one run (:func:`leanscale.scaling._train.train_run`; ``run_sweep`` passes
  its own name for it, so a test can replace it).
* ``"process"`` (:func:`_run_process`): ``n_workers`` spawned processes, each holding the tokens
  once and dying with the sweep (:func:`_die_with_parent`).
* ``"ray"`` (:func:`_run_ray`): Ray tasks of one CPU each, on a local or a given cluster.

The worker processes train with :func:`~leanscale.scaling._train.train_run` itself: a function
replaced in this process does not reach them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from leanscale.core.errors import MissingDependencyError
from leanscale.scaling._train import RunSpec, train_run
from leanscale.scaling.sweep_config import SweepConfig

__all__: list[str] = []


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Worker-process state of the "process" executor: set once per worker by _init_worker.
_WORKER_TOKENS: np.ndarray | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker process exit as soon as ``parent_pid`` (the sweep) dies, even by ``kill -9``.

    A worker whose parent was killed would otherwise train on for minutes, and keep the
    multiprocessing resource tracker alive with it. On Linux the kernel delivers SIGKILL to the
    worker when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere, a daemon thread checks
    once every 0.2 s that the parent is still ours (``os.getppid()`` changes when it dies).
    """
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no libc symbol: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="leanscale-parent-watchdog", daemon=True).start()


def _init_worker(tokens: np.ndarray, n_threads: int, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    import torch

    global _WORKER_TOKENS
    _WORKER_TOKENS = tokens
    torch.set_num_threads(n_threads)


def _worker_train(spec: RunSpec, max_minutes: float | None) -> dict:
    return train_run(spec, _WORKER_TOKENS, max_minutes=max_minutes)


def _ray_train(spec: RunSpec, tokens: np.ndarray, n_threads: int, max_minutes: float | None) -> dict:
    import torch

    torch.set_num_threads(n_threads)
    return train_run(spec, tokens, max_minutes=max_minutes)


def _worker_threads(config: SweepConfig) -> int:
    """Torch threads of one run in a worker: ``n_threads``, else the cores shared out."""
    return config.n_threads or max(1, _cores() // config.n_workers)


def _run_serial(todo, tokens, config, record, train: Callable = train_run):
    # ``train(spec, stream, max_minutes=)`` trains one run in this process.
    import torch

    from leanscale.data.text import TokenStream

    stream = TokenStream(tokens, config.val_fraction)  # one split shared by every run
    before = torch.get_num_threads()
    if config.n_threads:
        torch.set_num_threads(config.n_threads)
    try:
        for spec in todo:
            record(spec, train(spec, stream, max_minutes=config.max_minutes))
    finally:
        torch.set_num_threads(before)


def longest_first(todo: list[RunSpec]) -> list[RunSpec]:
    """The runs by tokens to train, most first (ties in grid order): the parallel executors'
    order. A run's time grows with its tokens (a tiny model's throughput in tokens/s varies ~2.5x
    over a sweep's sizes, its tokens ~7x within one budget), and starting the longest first keeps
    a long run from starting last while the other workers idle (the tour's 15 runs on 2 workers:
    238 s instead of 250 s in grid order, for 236 s of runs per worker)."""
    return sorted(todo, key=lambda spec: -spec.n_tokens)


def _run_process(todo, tokens, config, record, worker: Callable = _worker_train):
    # ``worker(spec, max_minutes)`` trains one run in a worker process (a module-level function:
    # the tests pass a quick fake one).
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    n_threads = _worker_threads(config)
    with ProcessPoolExecutor(
        max_workers=config.n_workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(tokens, n_threads, os.getpid()),
    ) as pool:
        pending = {pool.submit(worker, spec, config.max_minutes): spec for spec in longest_first(todo)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record(pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "The 'ray' executor needs Ray: pip install 'leanscale[ray]'"
        ) from None
    return ray


def _run_ray(todo, tokens, config, record):
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=config.n_workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        n_threads = config.n_threads or (1 if config.ray_address else _worker_threads(config))
        remote = ray.remote(num_cpus=1)(_ray_train)
        tokens_ref = ray.put(tokens)
        pending = {remote.remote(spec, tokens_ref, n_threads, config.max_minutes): spec
                   for spec in longest_first(todo)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    record(pending.pop(ref), ray.get(ref))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


_EXECUTORS: dict[str, Callable] = {"serial": _run_serial, "process": _run_process, "ray": _run_ray}
