"""`surgery serve` driven by the official OpenAI client, with the embedded SmolLM2 (slow).

The server runs on a free loopback port of this process (:func:`experiments.serving.local.serve_in_thread`);
requests go through ``openai.OpenAI``, concurrently, plain and with different stacks, streaming and
not. Each greedy completion must equal ``tr.generate`` alone with the same blocks built by the
library's own classes, token for token, and each probe summary the library's for that row.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import surgery
from experiments.row_summaries import summarise_row
from experiments.serving.local import serve_in_thread
from experiments.serving.server import ServerSettings
from interventions import SteeringVector, TokenMask
from probes import MIEstimator
from tolerance import assert_close

pytestmark = pytest.mark.slow

LAYER = 15
QUESTION = "What is 7 * 8? Answer briefly."


def _vector(d_model: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2, tiny_llama):
    """--files: a SmolLM2 steering vector, one made for another model, and a file outside the folder."""
    root = tmp_path_factory.mktemp("serve")
    folder = root / "vectors"
    folder.mkdir()
    steer = SteeringVector(_vector(smollm2.d_model), layer=LAYER, alpha=1.0, when=surgery.Always(),
                           metadata={"architecture": smollm2.architecture.name, "d_model": smollm2.d_model})
    surgery.save_blocks(folder / "smol.safetensors", [steer], smollm2)
    other = SteeringVector(_vector(tiny_llama.d_model), layer=1, when=surgery.Always())
    surgery.save_blocks(folder / "tiny.safetensors", [other], tiny_llama)
    surgery.save_blocks(root / "outside.safetensors", [steer], smollm2)
    return folder


@pytest.fixture(scope="module")
def served(smollm2, files):
    settings = ServerSettings(slots=4, max_tokens=512, files=files)
    with serve_in_thread(settings, model=smollm2) as base_url:
        yield base_url, openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=300)


def _alone(model, blocks, prompt, max_tokens, chat=True, **options):
    with surgery.trace(model, *blocks) as tr:
        return tr.generate([prompt], max_tokens, chat=chat, **options)


def _steering(model, alpha):
    return SteeringVector(_vector(model.d_model), layer=LAYER, alpha=alpha, when=surgery.Always())


def _chat(client, content, max_tokens, stream=False, **extra):
    request = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}],
                   max_tokens=max_tokens, temperature=0, stream=stream)
    surgery_fields = {k: extra.pop(k) for k in ("interventions", "probes") if k in extra}
    response = client.chat.completions.create(**request, **extra, extra_body=surgery_fields or None)
    if not stream:
        return response.choices[0].message.content, response.choices[0].finish_reason, response.model_extra["surgery"]
    text, reason, entry = "", None, None
    for chunk in response:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
        entry = (chunk.model_extra or {}).get("surgery", entry)
    return text, reason, entry


def test_concurrent_requests_with_different_stacks_each_equal_their_run_alone(served, smollm2):
    _, client = served
    mask_words = ["calculate", "multiply"]
    requests = {
        "plain": dict(content=QUESTION, max_tokens=40),
        "steered+": dict(content=QUESTION, max_tokens=40, stream=True,
                         interventions=[{"type": "steering_vector", "from": "smol.safetensors", "alpha": 4.0}]),
        "steered-": dict(content="Name three colours.", max_tokens=32,
                         interventions=[{"type": "steering_vector", "from": "smol.safetensors", "alpha": -4.0}],
                         probes=[{"type": "mi_estimator", "answers": ["red"]}]),
        "masked": dict(content=QUESTION, max_tokens=40, stream=True,
                       interventions=[{"type": "token_mask", "words": mask_words, "penalty": -50.0}],
                       probes=[{"type": "mi_estimator", "answers": ["56"]}]),
        "stop": dict(content="Count from 1 to 20, one number per line.", max_tokens=60, stop=["7"]),
        "plain-stream": dict(content="Name three colours.", max_tokens=24, stream=True),
    }
    waves = _stats(served[0])["waves"]
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = {name: pool.submit(_chat, client, **dict(spec)) for name, spec in requests.items()}
        served_results = {name: future.result() for name, future in futures.items()}
    # the first request starts a wave at once; the others arrive while it runs and share the next
    assert _stats(served[0])["waves"] - waves <= 2

    references = {
        "plain": ([], []),
        "steered+": ([_steering(smollm2, 4.0)], []),
        "steered-": ([_steering(smollm2, -4.0)], [MIEstimator(answers=["red"])]),
        "masked": ([TokenMask(words=mask_words, penalty=-50.0)], [MIEstimator(answers=["56"])]),
        "stop": ([], []),
        "plain-stream": ([], []),
    }
    for name, (interventions, probes) in references.items():
        spec = requests[name]
        stops = spec.get("stop", [])
        out = _alone(smollm2, [*interventions, *probes], spec["content"], spec["max_tokens"], stop_strings=stops)
        text, reason, entry = served_results[name]
        expected = out.texts[0]
        for stop in stops:  # OpenAI's completion ends before the stop string
            expected = expected.split(stop)[0]
        assert text == expected, name
        assert reason == {"eos": "stop", "stop_string": "stop", "length": "length"}[out.stop_reasons[0]], name
        choice = entry["choice"] if "choice" in entry else entry["choices"][0]
        record = summarise_row(out.row(0), {b.name: b for b in interventions}, {b.name: b for b in probes},
                               smollm2.tokenizer).record
        assert choice["fired"] == record["fired"], name
        for probe, summary in record["probes"].items():
            assert choice["probes"][probe]["peaks"] == summary["peaks"], name
            assert_close(torch.tensor(choice["probes"][probe]["values"]), torch.tensor(summary["values"]),
                         precision=torch.float32)
    assert served_results["steered+"][2]["choice"]["fired"]["steering_vector"], "the steering fired"
    assert served_results["stop"][1] == "stop" and "7" not in served_results["stop"][0]


def test_completions_with_n_and_several_prompts(served, smollm2):
    _, client = served
    response = client.completions.create(model="SmolLM2-135M-Instruct", prompt=["The capital of France is", "2 + 2 ="],
                                         max_tokens=8, temperature=0, n=2)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    alone = [surgery.generate(smollm2, [p], 8).texts[0] for p in ("The capital of France is", "2 + 2 =")]
    assert texts == [alone[0], alone[0], alone[1], alone[1]]
    assert response.usage.completion_tokens == 4 * 8
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]


def test_a_seeded_sample_is_the_same_alone_and_in_a_crowd(served):
    _, client = served

    def sample(seed):
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Tell me a fact."}], max_tokens=20,
            temperature=0.9, seed=seed).choices[0].message.content

    alone = sample(7)
    with ThreadPoolExecutor(4) as pool:
        crowd = list(pool.map(sample, [3, 7, 11, 7]))
    assert crowd[1] == crowd[3] == alone
    assert len({crowd[0], crowd[1], crowd[2]}) > 1


@pytest.mark.parametrize("case", ["unknown block", "bad site", "vector of another model", "path outside",
                                  "no such file", "prompt over the context", "too many tokens", "answers count"])
def test_bad_input_is_a_400_naming_the_field_and_the_server_goes_on(served, case):
    _, client = served
    content, max_tokens, extra = QUESTION, 8, {}
    steer = {"type": "steering_vector", "from": "smol.safetensors"}
    if case == "unknown block":
        extra, param, words = {"interventions": [{"type": "steering"}]}, "interventions[0].type", "steering_vector"
    elif case == "bad site":
        extra, param, words = {"interventions": [{**steer, "site": "resid_pre.99"}]}, "interventions[0].site", "0..29"
    elif case == "vector of another model":
        extra, param, words = {"interventions": [{**steer, "from": "tiny.safetensors"}]}, "interventions[0].from", "d_model"
    elif case == "path outside":
        extra = {"interventions": [{**steer, "from": "../outside.safetensors"}]}
        param, words = "interventions[0].from", "outside"
    elif case == "no such file":
        extra, param, words = {"interventions": [{**steer, "from": "nope.safetensors"}]}, "interventions[0].from", "no file"
    elif case == "prompt over the context":
        content, param, words = "hello " * 9000, "messages", "context"
    elif case == "too many tokens":
        max_tokens, param, words = 100_000, "max_tokens", "512"
    else:
        extra = {"probes": [{"type": "mi_estimator", "answers": ["1", "2", "3"]}]}
        param, words = "probes[0].answers", "one"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}],
                                       max_tokens=max_tokens, temperature=0, extra_body=extra)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == param and words in error["message"], error
    after = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert after.choices[0].message.content


def test_a_block_the_model_refuses_fails_only_its_own_request(served):
    _, client = served

    def ask(probes):
        return client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=6,
                                              messages=[{"role": "user", "content": "Hi"}], extra_body={"probes": probes})

    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(ask, [{"type": "mi_estimator"}])  # no answers: refused when the wave binds it
        good = pool.submit(ask, [])
        assert good.result().choices[0].message.content
        with pytest.raises(openai.BadRequestError) as refused:
            bad.result()
    assert refused.value.body["param"] == "probes[0]" and "answers" in refused.value.body["message"]


def test_unknown_model_and_unsupported_fields(served):
    _, client = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, logprobs=True)
    assert refused.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=5)
    assert invalid.value.body["param"] == "temperature"


def _stats(base_url):
    return httpx.get(base_url.removesuffix("/v1") + "/surgery/stats").json()


def _wait_idle(base_url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = _stats(base_url)
        if stats["busy_slots"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"still busy after {seconds} s: {_stats(base_url)}")


def test_a_client_that_disconnects_frees_its_slot(served):
    base_url, client = served
    before = _stats(base_url)["cancelled_rows"]
    long = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Write a long story."}],
                max_tokens=500, temperature=0)
    stream = client.chat.completions.create(**long, stream=True)
    for _, _ in zip(range(4), stream):
        pass
    stream.close()  # 500 tokens would take far longer than the wait below
    _wait_idle(base_url, 10)
    impatient = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(**long)
    _wait_idle(base_url, 10)
    assert _stats(base_url)["cancelled_rows"] == before + 2


def test_the_queue_limit_answers_429(served, smollm2):
    _, client = served  # idle while this test's own server (one slot, one waiting request) runs
    with serve_in_thread(ServerSettings(slots=1, max_queue=1, max_tokens=512), model=smollm2) as base_url:
        small = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=300)
        long = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Write a story."}],
                    max_tokens=60, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(small.chat.completions.create, **long)
            _wait_for(lambda: _stats(base_url)["busy_slots"] > 0)
            waiting = pool.submit(small.chat.completions.create, **long)
            _wait_for(lambda: _stats(base_url)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as limited:
                small.chat.completions.create(**long)
            assert limited.value.status_code == 429 and "queue" in limited.value.body["message"]
            assert running.result().choices[0].message.content == waiting.result().choices[0].message.content
        assert small.chat.completions.create(**{**long, "max_tokens": 4}).choices[0].message.content


def _wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_streams_with_several_choices_and_usage_match_the_whole_response(served):
    _, client = served
    request = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a fruit."}],
                   max_tokens=12, temperature=0, n=2)
    whole = client.chat.completions.create(**request)
    texts, reasons, usage, entries = ["", ""], [None, None], None, {}
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            if choice.finish_reason:
                entries[choice.index] = chunk.model_extra["surgery"]["choice"]
    assert texts == [c.message.content for c in whole.choices] and reasons == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    assert [entries[0]["index"], entries[1]["index"]] == [0, 1]
    pieces = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
                                       temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in pieces)
    assert streamed == client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                                 max_tokens=8, temperature=0).choices[0].text


def test_a_streamed_request_whose_blocks_are_refused_gets_its_400_before_any_event(served):
    _, client = served
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, stream=True, extra_body={"probes": [{"type": "mi_estimator"}]})
    assert refused.value.body["param"] == "probes[0]"
