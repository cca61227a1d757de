"""The README's "Serving" section: its Python lines run against a server, its lm-eval task is sound."""

import re
from pathlib import Path

import pytest
import torch
import yaml

import surgery
from experiments.serving import ServerSettings, serve_in_thread
from interventions import SteeringVector

ROOT = Path(__file__).resolve().parents[1]
SECTION = ROOT.joinpath("README.md").read_text().split("## Serving")[1].split("\n## ")[0]


def test_the_lm_eval_task_reads_the_local_gsm8k_file_and_the_command_names_it():
    task = yaml.safe_load((ROOT / "studies" / "lm-eval" / "gsm8k_cot_zeroshot_local.yaml").read_text())
    assert task["dataset_path"] == "json" and task["test_split"] == "test"
    data = ROOT / task["dataset_kwargs"]["data_files"]["test"]  # relative to the checkout, where lm_eval runs
    assert data.is_file() and '"question"' in data.open().readline()
    command = SECTION.split("```bash")[2].split("```")[0]
    assert f"--tasks {task['task']}" in command and "--include_path studies/lm-eval" in command
    assert '"interventions": [{"type": "steering_vector", "from": "seal.safetensors"}]' in command


@pytest.mark.slow
def test_the_python_lines_run_against_a_server(tmp_path, smollm2):
    vector = SteeringVector(torch.randn(smollm2.d_model, generator=torch.Generator().manual_seed(0)), layer=20,
                            when=surgery.OnText("\n\n"))
    surgery.save_blocks(tmp_path / "seal.safetensors", [vector], smollm2)
    code = SECTION.split("```python")[1].split("```")[0]
    with serve_in_thread(ServerSettings(files=tmp_path), model=smollm2) as base_url:
        code = re.sub(r"http://127\.0\.0\.1:8000/v1", base_url, code)
        lines = code.strip().splitlines()
        namespace = {}
        exec("\n".join(lines[:-2]), namespace)  # the request
        text = eval(lines[-2], namespace)
        peaks = eval(lines[-1], namespace)
    assert isinstance(text, str) and text and isinstance(peaks, list)
