"""Waves: requests with different stacks share a pool, each row as alone; a bad request fails alone."""

import queue
import time

import pytest
import torch

import surgery
from experiments.row_summaries import summarise_row
from experiments.serving.errors import RequestError
from experiments.serving.request_blocks import RequestStack, parse_stack
from experiments.serving.scheduler import Job, Scheduler
from interventions import TokenMask
from probes import MIEstimator
from tolerance import assert_close

PROMPTS = ["So the answer is", "Wait, let me check", "Alternatively"]


def _job(model, prompt, stack=RequestStack(), max_tokens=12, n=1, greedy=True, seed=None, stops=()):
    events = queue.Queue()
    ids = model.tokenizer(prompt)["input_ids"]
    job = Job(prompts=[ids], n=n, max_tokens=max_tokens, greedy=greedy, temperature=0.8, top_p=1.0, seed=seed,
              stops=tuple(stops), stream=False, stack=stack, send=events.put)
    return job, events


def _results(events, timeout=120):
    rows = {}
    while True:
        event = events.get(timeout=timeout)
        if event[0] == "error":
            return event[1]
        if event[0] == "row":
            rows[event[1].index] = event[1]
        if event[0] == "done":
            return [rows[i] for i in sorted(rows)]


@pytest.fixture
def scheduler(tiny_r1):
    scheduler = Scheduler(tiny_r1, slots=2, max_queue=8)
    yield scheduler
    scheduler.close()


def test_one_wave_of_different_stacks_equals_each_alone(tiny_r1, scheduler):
    masked = parse_stack([{"type": "token_mask", "words": [" is"], "penalty": -30.0}],
                         [{"type": "mi_estimator", "answers": ["5"]}], files=None, model=tiny_r1, rows=1)
    jobs = [_job(tiny_r1, PROMPTS[0]), _job(tiny_r1, PROMPTS[1], masked), _job(tiny_r1, PROMPTS[2], masked, n=2)]
    waves = scheduler.stats["waves"]
    with scheduler.held():
        for job, _ in jobs:
            scheduler.submit(job)
    results = [_results(events) for _, events in jobs]
    assert scheduler.stats["waves"] == waves + 1
    plain = surgery.generate(tiny_r1, [PROMPTS[0]], 12)
    assert results[0][0].token_ids == plain.token_ids[0] and results[0][0].surgery["fired"] == {}
    for prompt, got in ((PROMPTS[1], results[1]), (PROMPTS[2], results[2])):
        mask, mi = TokenMask(words=[" is"], penalty=-30.0), MIEstimator(answers=["5"])
        with surgery.trace(tiny_r1, mask, mi) as tr:
            alone = tr.generate([prompt], 12)
        record = summarise_row(alone.row(0), {"token_mask": mask}, {"mi_estimator": mi}, tiny_r1.tokenizer).record
        assert record["fired"]["token_mask"], "the mask fired"
        for row in got:
            assert row.token_ids == alone.token_ids[0]
            assert row.surgery["fired"] == record["fired"]
            assert row.surgery["probes"]["mi_estimator"]["peaks"] == record["probes"]["mi_estimator"]["peaks"]
            assert_close(torch.tensor(row.surgery["probes"]["mi_estimator"]["values"]),
                         torch.tensor(record["probes"]["mi_estimator"]["values"]), precision=torch.float32)
    assert len(results[2]) == 2


def test_a_request_the_model_refuses_fails_alone(tiny_r1, scheduler):
    no_answers = parse_stack(None, [{"type": "mi_estimator"}], files=None, model=tiny_r1, rows=1)
    bad, bad_events = _job(tiny_r1, PROMPTS[0], no_answers)
    good, good_events = _job(tiny_r1, PROMPTS[1])
    with scheduler.held():
        scheduler.submit(bad)
        scheduler.submit(good)
    error = _results(bad_events)
    assert isinstance(error, RequestError) and error.param == "probes[0]" and error.status == 400
    assert _results(good_events)[0].token_ids == surgery.generate(tiny_r1, [PROMPTS[1]], 12).token_ids[0]


def test_seeded_rows_sample_the_same_in_any_wave(tiny_r1, scheduler):
    alone, events = _job(tiny_r1, PROMPTS[0], greedy=False, seed=5, n=2)
    scheduler.submit(alone)
    first = _results(events)
    crowd = [_job(tiny_r1, p, greedy=False, seed=s) for p, s in ((PROMPTS[1], 1), (PROMPTS[0], 5), (PROMPTS[2], 9))]
    with scheduler.held():
        for job, _ in crowd:
            scheduler.submit(job)
    again = _results(crowd[1][1])
    assert again[0].token_ids == first[0].token_ids
    assert first[0].token_ids != first[1].token_ids  # each choice its own stream


def test_the_queue_limit_and_cancelled_requests(tiny_r1):
    scheduler = Scheduler(tiny_r1, slots=1, max_queue=2)
    try:
        with scheduler.held():
            kept, kept_events = _job(tiny_r1, PROMPTS[0])
            gone, gone_events = _job(tiny_r1, PROMPTS[1])
            scheduler.submit(kept)
            scheduler.submit(gone)
            with pytest.raises(RequestError) as full:
                scheduler.submit(_job(tiny_r1, PROMPTS[2])[0])
            gone.cancelled.set()
        assert full.value.status == 429
        assert _results(kept_events)[0].token_ids
        assert gone_events.empty() and scheduler.stats["finished_rows"] == 1
    finally:
        scheduler.close()


def test_requests_arriving_mid_wave_join_it_when_their_blocks_are_already_there(tiny_r1, scheduler):
    masked = [{"type": "token_mask", "words": [" is"], "penalty": -30.0}]
    stack = parse_stack(masked, None, files=None, model=tiny_r1, rows=1)
    other = parse_stack([{**masked[0], "penalty": -10.0}], None, files=None, model=tiny_r1, rows=1)
    long_plain, long_events = _job(tiny_r1, PROMPTS[0], max_tokens=60)
    long_masked, masked_events = _job(tiny_r1, PROMPTS[1], stack, max_tokens=60)
    with scheduler.held():
        scheduler.submit(long_plain)
        scheduler.submit(long_masked)
    while scheduler.busy_slots() == 0:
        time.sleep(0.001)
    started = scheduler.stats["waves"]
    late = {"plain": _job(tiny_r1, PROMPTS[2]), "same stack": _job(tiny_r1, PROMPTS[2], stack),
            "other stack": _job(tiny_r1, PROMPTS[2], other)}
    for job, _ in late.values():
        scheduler.submit(job)
    results = {name: _results(events)[0] for name, (_, events) in late.items()}
    assert _results(long_events) and _results(masked_events)
    assert scheduler.stats["joined_late"] == 2 and scheduler.stats["waves"] == started + 1
    assert results["plain"].token_ids == surgery.generate(tiny_r1, [PROMPTS[2]], 12).token_ids[0]
    for name, penalty in (("same stack", -30.0), ("other stack", -10.0)):
        mask = TokenMask(words=[" is"], penalty=penalty)
        with surgery.trace(tiny_r1, mask) as tr:
            alone = tr.generate([PROMPTS[2]], 12)
        assert results[name].token_ids == alone.token_ids[0]
        assert results[name].surgery["fired"]["token_mask"] == mask.fired()[0]


def test_a_lone_request_decodes_alone_and_an_arrival_meanwhile_opens_the_next_waves_slots(tiny_r1, scheduler):
    def slots_of_running_wave(wave):
        while not (scheduler.stats["waves"] == wave and scheduler.busy_slots() > 0):
            time.sleep(0.0005)
        return len(scheduler._tap.slot_rows)

    first, first_events = _job(tiny_r1, PROMPTS[0], max_tokens=60)
    scheduler.submit(first)
    assert slots_of_running_wave(1) == 1  # one request, nobody else: one slot decoded
    second, second_events = _job(tiny_r1, PROMPTS[1], max_tokens=60)
    scheduler.submit(second)  # arrives mid-wave: the first wave has no open slot, so it waits
    assert _results(first_events)
    assert slots_of_running_wave(2) == 2  # requests overlapped: the next wave opens every slot
    assert _results(second_events) and scheduler.stats["joined_late"] == 0


def test_unseeded_requests_sample_their_own_streams(tiny_r1, scheduler):
    jobs = [_job(tiny_r1, PROMPTS[0], greedy=False, max_tokens=16) for _ in range(2)]
    with scheduler.held():
        for job, _ in jobs:
            scheduler.submit(job)
    first, second = (_results(events)[0].token_ids for _, events in jobs)
    assert first != second  # one wave, one prompt, row 0 of each: different streams


def test_a_wave_that_fails_mid_run_fails_the_requests_that_joined_it_too(tiny_r1, scheduler, monkeypatch):
    from experiments.serving.tap import ServerTap

    original = ServerTap.choose

    def choose(tap, choice):
        if len(tap.rows) > 2:  # a late request has joined
            raise RuntimeError("boom")
        original(tap, choice)

    monkeypatch.setattr(ServerTap, "choose", choose)
    short, short_events = _job(tiny_r1, PROMPTS[0], max_tokens=8)
    long, long_events = _job(tiny_r1, PROMPTS[1], max_tokens=60)
    with scheduler.held():
        scheduler.submit(short)
        scheduler.submit(long)
    while scheduler.busy_slots() == 0:
        time.sleep(0.001)
    late, late_events = _job(tiny_r1, PROMPTS[2], max_tokens=8)
    scheduler.submit(late)
    assert _results(short_events)[0].token_ids
    for events in (long_events, late_events):
        error = _results(events)
        assert isinstance(error, RequestError) and error.status == 500 and "boom" in error.message
    assert scheduler.stats["joined_late"] == 1
