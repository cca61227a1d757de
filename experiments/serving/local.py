"""The server inside this process: uvicorn on a thread, on a free loopback port (tests, notebooks, benchmarks).

Example::

    model = surgery.load()
    with serve_in_thread(ServerSettings(slots=8), model=model) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="-")
        client.chat.completions.create(model=model.name, messages=[...], temperature=0)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from experiments.serving.app import create_app
from experiments.serving.server import ServerSettings

__all__ = ["serve_in_thread"]


@contextlib.contextmanager
def serve_in_thread(settings: ServerSettings, model=None, host: str = "127.0.0.1", port: int = 0,
                    timeout: float = 120.0) -> Iterator[str]:
    """Run the server on a thread of this process; yields its base URL (``http://HOST:PORT/v1``).

    Args:
        settings: how the server runs.
        model: an already loaded model to serve (None loads ``settings.model``).
        host: where it listens (loopback by default).
        port: 0 picks a free port.
        timeout: seconds to wait for it to start.

    Raises:
        RuntimeError: it did not start (e.g. the port is taken, the model failed to load).
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(settings, model=model), host=host, port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="surgery-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
