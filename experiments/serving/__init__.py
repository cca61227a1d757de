"""``surgery serve``: an OpenAI-compatible HTTP server where each request brings its own blocks.

One idea per module:

- ``request_schema``: the request bodies (pydantic), the fields refused by name;
- ``request_blocks``: a request's ``interventions``/``probes`` checked like a study's blocks, files
  only under ``--files``;
- ``server``: the settings, the loaded model, a request checked into a job;
- ``scheduler``: the one decode thread, the bounded queue, waves over a slot pool with a stack per row;
- ``tap``: the server's own block in every wave (streaming, per-request stop strings, gone clients);
- ``app``: the FastAPI routes, server-sent events, OpenAI-form responses and errors;
- ``replicas``: ``--replicas N`` behind Ray Serve;
- ``command``: the ``surgery serve`` options.

Example::

    $ surgery serve --port 8000 --files vectors
    $ curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is 7 * 8?"}],
        "temperature": 0, "interventions": [{"type": "steering_vector", "from": "seal.safetensors"}],
        "probes": [{"type": "mi_estimator", "answers": ["56"]}]}'
"""

from experiments.serving.app import create_app
from experiments.serving.local import serve_in_thread
from experiments.serving.server import Server, ServerSettings

__all__ = ["Server", "ServerSettings", "create_app", "serve_in_thread"]
