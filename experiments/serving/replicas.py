"""``surgery serve --replicas N``: N copies of the server behind Ray Serve's proxy and router.

Each replica is a Ray Serve deployment replica running the same FastAPI app
(:func:`experiments.serving.app.create_app`, through ``serve.ingress``): it loads its own copy of
the model when it starts (the app's lifespan) and runs its own decode thread and slot pool. Ray
Serve's HTTP proxy listens on ``--host``/``--port`` and routes each request to a replica; with
GPUs each replica asks for one, so N replicas fill N GPUs. ``--ray-address`` joins an existing
cluster instead of starting a local one. Nothing here balances load: Ray Serve does.

Example::

    $ surgery serve --replicas 2 --port 8000        # two copies of the embedded model
"""

from __future__ import annotations

import os

from experiments.serving.app import create_app
from experiments.serving.server import ServerSettings

__all__ = ["serve_replicas"]


def serve_replicas(settings: ServerSettings, replicas: int, host: str, port: int, address: str | None = None) -> None:
    """Run ``replicas`` copies of the server behind Ray Serve until interrupted.

    Args:
        settings: each replica's settings (its model loads in the replica's own process).
        replicas: how many copies.
        host, port: where Ray Serve's HTTP proxy listens.
        address: an existing Ray cluster (``"auto"``, ``"HOST:6379"``), or None for a local one.

    Raises:
        ImportError: Ray Serve is not installed (``pip install 'reasoning-surgery[serve]'``).
    """
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise ImportError("--replicas needs Ray Serve: pip install 'reasoning-surgery[serve]'") from error
    import torch

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    gpus = torch.cuda.device_count() if address is None else int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, (os.cpu_count() or 1) // replicas)
    serve.start(http_options={"host": host, "port": port})
    app = create_app(settings)

    @serve.deployment(
        name="surgery",
        num_replicas=replicas,
        ray_actor_options={"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 0, "runtime_env": {
            "env_vars": {"OMP_NUM_THREADS": str(cpus)}}},
        # waiting requests are the scheduler's business (its --max-queue answers 429)
        max_ongoing_requests=settings.max_queue + settings.slots,
        health_check_period_s=10,
    )
    @serve.ingress(app)
    class Replica:
        """One copy of the server: the app's lifespan loads the model."""

    try:
        serve.run(Replica.bind(), name="surgery", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
