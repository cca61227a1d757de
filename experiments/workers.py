"""A study sharded over Ray actors: ``surgery run STUDY --workers N [--ray-address ADDR]``.

:func:`run_study_on_ray` starts one Ray actor per shard. Actor ``i`` of ``n`` loads the study's
model itself, on its own device (one GPU per actor when the cluster has GPUs; on CPUs a fair
share of the cores as torch threads), and calls :func:`~experiments.runner.run_study` with
``shard=(i, n)``: problems ``i, i + n, ...``, every condition, appended to the one
:class:`~experiments.store.ResultStore` of ``config.output`` (appends from several processes are
safe: each holds an ``flock``). Rows do not depend on their batch or shard (sampling draws each
row from its own stream, keyed by the problem id), so the store ends as one process would leave it.

Ray does the scheduling, the transport and the failure reports; this module only starts the
actors, waits for them and shows a progress bar (rate and ETA) counted from the store. Stopped
at any moment (Ctrl-C, a failed worker, a killed machine), the store keeps every finished row and
the same call resumes.

Ray is optional (the ``study`` extra: ``pip install -e '.[study]'``): ``workers=1`` without an
address runs in this process and never imports it. Without ``address`` a local cluster is
started on this machine and shut down at the end; with one (``"auto"``, ``"ray://host:10001"``,
``"host:6379"``) the actors run on that cluster. Every actor writes into ``config.output``
*as its path reads on the driver*: on a cluster of several machines that folder must be on a
file system all of them mount at the same path and where ``flock`` works between machines (not
every network file system does), and the project must be installed on every node.

Example::

    config = load_study_config("EXPERIMENT.toml")
    store = run_study_on_ray(config, workers=2)           # a local Ray cluster, two actors
    store = run_study_on_ray(config, workers=8, address="auto")   # an existing cluster, 8 GPUs
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from experiments.runner import run_study, study_problems
from experiments.store import ResultStore
from experiments.study_config import StudyConfig

__all__ = ["run_study_on_ray"]

_POLL_SECONDS = 1.0
_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding experiments/, surgery/, ...


def run_study_on_ray(config: StudyConfig, *, workers: int, address: str | None = None,
                     progress: bool = True) -> ResultStore:
    """Run what ``config`` asks and its store lacks, sharded over ``workers`` Ray actors; return the store.

    Args:
        config: the checked study (:func:`~experiments.study_config.load_study_config`).
        workers: how many actors (shards); ``1`` without ``address`` runs in this process, no Ray.
            On GPUs each actor holds one GPU (more workers than GPUs: the rest wait for a free one).
        address: an existing Ray cluster (as ``ray.init(address=...)`` takes it); default: start
            a local one on this machine (or use the Ray session this process already has).
        progress: a progress bar over (problem, condition) pairs, with rate and ETA.

    Raises:
        ValueError: ``workers`` below 1, or ``config.output`` holds another study.
        TypeError: ``workers`` is not an int.
        ImportError: Ray is not installed (install the ``study`` extra).
        RuntimeError: a worker failed (the message names it and holds its error); the others are
            stopped, and what finished stays in the store.
    """
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be a whole number >= 1, got {workers!r} ({type(workers).__name__})")
    if workers < 1:
        raise ValueError(f"workers must be a whole number >= 1 (1 runs in this process, without Ray), got {workers}")
    if workers == 1 and address is None:
        return run_study(config, progress=progress)
    ray = _import_ray()
    store = ResultStore(config.output, config.to_dict())  # another study's folder is refused before Ray starts
    wanted = {(problem.id, condition) for problem in study_problems(config) for condition in config.conditions}
    if wanted <= store.done():
        return store
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 ignore_reinit_error=True)
    actors = []
    try:
        actors = _start_actors(ray, config, workers)
        _wait(ray, actors, store, wanted, desc=config.name, progress=progress)
    finally:
        for actor in actors:  # also on Ctrl-C: the store keeps what finished; the same call resumes
            ray.kill(actor)
        if started:
            ray.shutdown()
    return store


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "running a study on several workers (--workers N > 1, or --ray-address) needs Ray, which is not "
            "installed: install the study extra, pip install -e '.[study]' (or pip install 'ray>=2.9'), "
            "or run with --workers 1"
        ) from error
    return ray


def _start_actors(ray, config: StudyConfig, workers: int) -> list:
    """One actor per shard: a GPU each where the cluster has GPUs (and the study does not ask for
    the CPU), else an equal share of the CPUs of one node, as torch threads."""
    gpus = ray.cluster_resources().get("GPU", 0) > 0 and config.model.device not in ("cpu", "mps")
    node_cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    threads = max(1, min(int(sum(node_cpus)) // workers, int(max(node_cpus, default=1))))
    options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}
    # local workers start from the driver's folder, not from ours: put this checkout first on
    # their path, so they run the code the driver runs (a path missing on a remote node is skipped)
    options["runtime_env"] = {"env_vars": {"PYTHONPATH": f"{_ROOT}{os.pathsep}${{PYTHONPATH}}"}}
    actor = ray.remote(_ShardWorker).options(**options)
    return [actor.remote(config, (index, workers), threads) for index in range(workers)]


def _wait(ray, actors: list, store: ResultStore, wanted: set, desc: str, progress: bool) -> None:
    """Run every actor's shard, counting the store's new rows into a progress bar. An actor that is
    done is killed at once, so that its GPU or CPUs go to a worker still waiting for them (more
    workers than devices); a failed one is raised at once, naming its worker."""
    workers = len(actors)
    calls = {actor.run.remote(): index for index, actor in enumerate(actors)}
    initial = len(wanted & store.done())
    with tqdm(total=len(wanted), initial=initial, unit="run", desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        bar.set_postfix_str(f"{workers} workers")
        pending = list(calls)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_SECONDS)
            for ref in ready:
                index = calls[ref]
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as error:
                    raise RuntimeError(
                        f"worker {index} of {workers} (problems {index}, {index + workers}, ... of the study) "
                        f"failed; the other workers were stopped, and the store in {store.folder} keeps every "
                        f"finished row (run the same command again to resume). The worker's error:\n{error}"
                    ) from error
                ray.kill(actors[index])
            bar.update(len(wanted & store.done()) - bar.n)


class _ShardWorker:
    """A Ray actor (made one by :func:`_start_actors`): one shard of a study, its own model."""

    def __init__(self, config: StudyConfig, shard: tuple[int, int], threads: int) -> None:
        import torch

        self.config, self.shard = config, shard
        torch.set_num_threads(threads)

    def run(self) -> None:
        """Run the shard into the study's store."""
        import ray

        model = None
        spec = self.config.model
        if ray.get_gpu_ids() and spec.device.startswith("cuda:"):
            # Ray shows an actor only its own GPU, as cuda:0: load there, keep the study's config
            model = dataclasses.replace(spec, device="cuda").load()
        run_study(self.config, model=model, shard=self.shard, progress=False)
