"""`surgery serve`: options to settings, presets checked, and Ray Serve replicas end to end (slow)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import surgery
from experiments.cli import main
from experiments.serving.command import add_serve_parser, settings_from
from experiments.serving.server import read_preset
from interventions import TokenMask


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_options_become_settings(tmp_path):
    stack = tmp_path / "masked.json"
    stack.write_text(json.dumps({"interventions": [{"type": "token_mask", "words": ["Wait"]}]}))
    settings = settings_from(_args("--slots", "3", "--max-queue", "5", "--files", str(tmp_path), "--cache", "static",
                                   "--stack", f"masked={stack}"))
    assert (settings.slots, settings.max_queue, settings.cache, settings.files) == (3, 5, "static", tmp_path)
    assert settings.presets == {"masked": {"interventions": [{"type": "token_mask", "words": ["Wait"]}]}}


def test_bad_options_are_refused_before_a_model_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match="NAME=FILE"):
        read_preset("just-a-name")
    (tmp_path / "bad.json").write_text('{"blocks": []}')
    with pytest.raises(ValueError, match="interventions"):
        read_preset(f"x={tmp_path / 'bad.json'}")
    assert main(["serve", "--files", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--slots", "0"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_replicas_behind_ray_serve_answer_as_one_model_does(tmp_path, smollm2):
    stack = tmp_path / "masked.json"
    stack.write_text(json.dumps({"interventions": [{"type": "token_mask", "words": ["Paris"], "penalty": -50.0}]}))
    port = _free_port()
    command = [str(Path(sys.executable).parent / "surgery"), "serve", "--replicas", "2", "--port", str(port),
               "--slots", "2", "--max-tokens", "64", "--stack", f"masked={stack}"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray Serve did not start in 300 s"
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=2, timeout=300)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct", "masked"]
        prompt = "The capital of France is"

        def ask(model):
            return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, ["SmolLM2-135M-Instruct", "masked", "SmolLM2-135M-Instruct", "masked"]))
        plain = surgery.generate(smollm2, [prompt], 8).texts[0]
        with surgery.trace(smollm2, TokenMask(words=["Paris"], penalty=-50.0)) as tr:
            masked = tr.generate([prompt], 8).texts[0]
        assert texts == [plain, masked, plain, masked] and plain != masked
        pids = {httpx.get(f"{base}/surgery/stats", timeout=10).json()["pid"] for _ in range(40)}
        assert len(pids) == 2, "both replicas answer"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        log.close()
