"""load_problems: GSM8K and MATH JSONL, local files through datasets, the offline hub, every error."""

import json
import time
from pathlib import Path

import pytest

from experiments.datasets import SAMPLE_GSM8K, load_problems, sample_problems

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"  # ../shared/data


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def raw_final_answers(path: Path, count: int) -> list[str]:
    """The text after '#### ' on the first ``count`` lines, split by hand (not through load_problems)."""
    lines = path.read_text(encoding="utf-8").splitlines()[:count]
    return [line.split("#### ")[1].rstrip('"}').replace(",", "") for line in lines]


def test_the_first_20_real_gsm8k_problems():
    problems = load_problems(GSM8K_TEST, limit=20)
    assert [p.id for p in problems] == [f"test-{i}" for i in range(20)]
    assert [p.answer for p in problems] == raw_final_answers(GSM8K_TEST, 20)
    first = problems[0]
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18" and first.solution.endswith("every day at the farmer\u2019s market.")
    assert "####" not in first.solution and first.meta == {}


def test_ids_are_line_indices_before_offset_and_limit():
    window = load_problems(GSM8K_TEST, offset=15, limit=10, name="gsm8k-test")
    assert [p.id for p in window] == [f"gsm8k-test-{i}" for i in range(15, 25)]
    first_20 = load_problems(GSM8K_TEST, limit=20, name="gsm8k-test")
    assert window[:5] == first_20[15:]


def test_thousands_commas_leave_the_reference_like_gsm8k_own_extract_answer():
    problems = load_problems(GSM8K_TEST)
    assert len(problems) == 1319
    raw = {p.id: line.split("#### ")[1] for p, line in zip(problems, GSM8K_TEST.read_text().splitlines())}
    with_commas = [p for p in problems if "," in raw[p.id]]
    assert with_commas and all("," not in p.answer and p.answer.isdigit() for p in with_commas)


def test_the_shipped_sample_is_the_start_of_the_test_set():
    sample = sample_problems()
    assert len(sample) == 60 and sample[59].id == "gsm8k-test-59"
    assert sample == load_problems(GSM8K_TEST, limit=60, name="gsm8k-test")
    assert (SAMPLE_GSM8K.parent / "LICENSE-gsm8k").read_text().startswith("MIT License")
    assert "Copyright (c) 2021 OpenAI" in (SAMPLE_GSM8K.parent / "LICENSE-gsm8k").read_text()


def test_math_style_answers_come_from_the_last_box(tmp_path):
    records = [
        {"problem": "Compute $\\sin 60^\\circ$.", "solution": "It is \\boxed{\\frac{\\sqrt{3}}{2}}.", "level": "Level 2", "type": "Precalculus"},
        {"problem": "Try twice.", "solution": "Maybe \\boxed{3}? No: $\\boxed{\\{1, 2\\}}$.", "level": "Level 5", "type": "Algebra"},
        {"problem": "An fbox.", "solution": "So \\fbox{x^{2} + 1}.", "level": "Level 1", "type": "Algebra"},
    ]
    problems = load_problems(write_jsonl(tmp_path / "math_test.jsonl", records))
    assert [p.answer for p in problems] == ["\\frac{\\sqrt{3}}{2}", "\\{1, 2\\}", "x^{2} + 1"]
    assert [p.id for p in problems] == ["math_test-0", "math_test-1", "math_test-2"]
    assert problems[0].meta == {"level": "Level 2", "type": "Precalculus"}
    assert problems[1].solution == records[1]["solution"] and problems[1].question == "Try twice."


def test_named_fields_and_the_plain_format(tmp_path):
    records = [{"prompt": "What is 7 * 8?", "target": "56", "source": "mine"}]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    (problem,) = load_problems(path, question_field="prompt", answer_field="target")
    assert (problem.question, problem.answer, problem.solution, problem.meta) == ("What is 7 * 8?", "56", "", {"source": "mine"})
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "3 + 5?", "answer": " 8 "}])
    assert load_problems(plain)[0].answer == "8"


def test_local_json_and_csv_through_datasets(tmp_path):
    rows = [{"question": "What is 7 * 8?", "answer": "7 * 8 = 56\n#### 56"}, {"question": "3 + 5?", "answer": "#### 1,008"}]
    json_file = tmp_path / "tiny.json"
    json_file.write_text(json.dumps(rows))
    problems = load_problems(json_file)
    assert [(p.id, p.answer, p.solution) for p in problems] == [("tiny-0", "56", "7 * 8 = 56"), ("tiny-1", "1008", "")]

    csv_file = tmp_path / "sheet.csv"
    csv_file.write_text("id,prompt,final\n0,What is 7 * 8?,56\n1,3 + 5?,8\n2,Half of one?,\\frac{1}{2}\n")
    problems = load_problems(csv_file, question_field="prompt", answer_field="final", offset=1)
    assert [(p.id, p.question, p.answer) for p in problems] == [("sheet-1", "3 + 5?", "8"), ("sheet-2", "Half of one?", "\\frac{1}{2}")]
    assert problems[0].meta == {"id": 1}


def test_a_hub_name_offline_fails_fast_and_points_to_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OSError, match="(?s)could not load 'openai/gsm8k'.*hub cannot be reached.*Pass a local file"):
        load_problems("openai/gsm8k", subset="main")
    assert time.perf_counter() - start < 10


def test_a_reachable_hub_is_read_through_datasets(monkeypatch):
    import datasets

    import surgery.hosts.loading

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return [{"question": "What is 7 * 8?", "answer": "#### 56"}, {"question": "3 + 5?", "answer": "#### 8"}]

    monkeypatch.setattr(surgery.hosts.loading, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("openai/gsm8k", subset="main", limit=1)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.id, p.answer) for p in problems] == [("gsm8k-test-0", "56")]


def test_a_missing_file_names_it_and_the_fix(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=f"(?s)no such file: '{missing}'.*Pass the path.*SAMPLE_GSM8K"):
        load_problems(missing)


def test_a_line_that_is_not_json_gives_its_number(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}, "", "{not json"])
    with pytest.raises(ValueError, match=f"{path} line 3 is not JSON.*fix or delete that line"):
        load_problems(path)
    assert len(load_problems(path, limit=1)) == 1  # lines after the limit are not read


def test_a_record_without_the_fields_names_the_fields_it_has(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "1 + 1?", "target": "2"}])
    with pytest.raises(ValueError, match=r"(?s)odd.jsonl line 1: cannot tell the format.*\['prompt', 'target'\].*question_field="):
        load_problems(path)
    with pytest.raises(ValueError, match=r"(?s)odd.jsonl line 1: no field 'question' or 'answer'.*\['prompt', 'target'\]"):
        load_problems(path, format="gsm8k")
    later = write_jsonl(tmp_path / "later.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?"}])
    with pytest.raises(ValueError, match=r"later.jsonl line 2: no field 'answer' for the gsm8k format.*\['question'\]"):
        load_problems(later)


def test_a_gsm8k_answer_without_the_marker(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?", "answer": "It is 4."}])
    with pytest.raises(ValueError, match=r"(?s)gsm.jsonl line 2: a GSM8K answer ends with '#### <final answer>'.*no ####.*format='plain'"):
        load_problems(path)


def test_a_math_solution_without_a_box(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1 + 1?", "solution": "It is $2$."}])
    with pytest.raises(ValueError, match=r"(?s)math.jsonl line 1: a MATH solution gives its final answer in \\boxed"):
        load_problems(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(format="gsm9k"), "unknown format 'gsm9k'"), (dict(offset=-1), "must not be negative"), (dict(limit=-2), "must not be negative")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_problems(SAMPLE_GSM8K, **kwargs)


def test_unsupported_files_and_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*notes.txt: the supported files are .jsonl, .json, .csv, .parquet"):
        load_problems(tmp_path / "notes.txt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_problems(tmp_path)


MATH500_TEST = GSM8K_TEST.parents[1] / "math500" / "test.jsonl"


def test_the_real_math500_reads_with_its_own_answers():
    problems = load_problems(MATH500_TEST)
    assert len(problems) == 500 and [p.id for p in problems[:2]] == ["test-0", "test-1"]
    raw = [json.loads(line) for line in MATH500_TEST.read_text(encoding="utf-8").splitlines()]
    # the last box of every solution is the record's own final answer, so the MATH format reads it
    assert [p.answer for p in problems] == [record["answer"] for record in raw]
    first = problems[0]
    assert first.question.startswith("Convert the point $(0,3)$") and first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta == {"answer": first.answer, "subject": "Precalculus", "level": 2}
    assert sorted({p.meta["level"] for p in problems}) == [1, 2, 3, 4, 5]


def test_a_hub_dataset_offline_reads_its_local_copy_with_the_same_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="HuggingFaceH4/MATH-500: offline mode is on.*reading its local copy"):
        problems = load_problems("HuggingFaceH4/MATH-500", split="test", fallback=MATH500_TEST, name="MATH-500-test",
                                 limit=3)
    assert [p.id for p in problems] == ["MATH-500-test-0", "MATH-500-test-1", "MATH-500-test-2"]
    assert problems == load_problems(MATH500_TEST, limit=3, name="MATH-500-test")
    with pytest.warns(UserWarning, match="openai/gsm8k"):
        gsm8k = load_problems("openai/gsm8k", subset="main", fallback=GSM8K_TEST, name="gsm8k-test", limit=60)
    assert gsm8k == sample_problems()  # the shipped sample's ids, whichever copy is read


def test_a_hub_dataset_offline_without_its_local_copy_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"(?s)the hub cannot be reached.*math-train.jsonl' does not exist.*hf download"):
        load_problems("DigitalLearningGmbH/MATH-lighteval", split="train", fallback=tmp_path / "math-train.jsonl")


def test_a_reachable_hub_is_read_even_with_a_local_copy(monkeypatch):
    import datasets

    import surgery.hosts.loading

    monkeypatch.setattr(surgery.hosts.loading, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, split: [{"question": "Q?", "answer": "#### 5"}])
    (problem,) = load_problems("openai/gsm8k", subset="main", fallback=GSM8K_TEST, name="gsm8k-test")
    assert (problem.id, problem.answer) == ("gsm8k-test-0", "5")
