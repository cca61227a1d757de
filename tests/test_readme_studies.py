"""The README's "Studies" section: its study file is a valid study and its Python lines hold."""

from pathlib import Path

from experiments import grade, load_problems, load_study_config, sample_problems

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def test_the_study_file_is_checked_and_names_what_the_section_says():
    config = load_study_config(ROOT / "studies" / "gsm8k-baselines.toml")
    assert list(config.conditions) == ["plain", "mask", "tts", "rr"] and set(config.probes) == {"mi", "thoughts", "graph"}
    assert config.dataset.sample == "gsm8k" and config.dataset.limit == 20
    assert config.output == str(ROOT / "studies" / "runs" / "gsm8k-baselines")
    assert "studies/gsm8k-baselines.toml" in (ROOT / "README.md").read_text()


def test_the_python_lines_of_the_section_hold():
    problems = load_problems(GSM8K, limit=20)
    assert len(problems) == 20 and problems[0].id == "test-0"
    assert [p.question for p in sample_problems(20)] == [p.question for p in problems]
    assert grade("... so she has 1,000 dollars left.", "1000").correct
