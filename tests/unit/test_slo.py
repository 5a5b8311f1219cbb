"""SLO-aware early rejection (kvserve/engine/slo.py): the predictor, pinned."""

from __future__ import annotations

import pytest

from kvserve.engine.slo import SLO, EngineLoad, Miss, Prediction, StepRates, predict, rejection


def test_nothing_measured_predicts_nothing_and_admits() -> None:
    rates = StepRates()
    prediction = predict(EngineLoad(5000, 10), rates, 100)
    assert prediction == Prediction(None, None)
    assert rejection(prediction, SLO(ttft_s=0.001, tpot_s=0.001)) is None


def test_ttft_is_the_queued_and_own_tokens_over_the_prefill_rate() -> None:
    rates = StepRates(weight=1.0)  # the last step only
    rates.observe(num_tokens=512, num_decodes=12, seconds=0.5)  # 1,024 tokens a second
    assert rates.prefill_tokens_per_s == pytest.approx(1024.0)
    prediction = predict(EngineLoad(3072, 0), rates, 512)
    assert prediction.ttft_s == pytest.approx(3.5)
    assert rejection(prediction, SLO(ttft_s=4.0)) is None
    miss = rejection(prediction, SLO(ttft_s=3.0))
    assert miss == Miss(
        "ttft",
        "predicted time to first token 3500 ms exceeds the server's objective of 3000 ms; "
        "retry later",
    )


def test_prefill_rate_is_weighted_toward_recent_steps() -> None:
    rates = StepRates(weight=0.5)
    rates.observe(100, 0, 1.0)  # 100 tok/s
    rates.observe(100, 0, 0.25)  # 400 tok/s
    # decayed sums: tokens 0.5 * 100 + 100 = 150, seconds 0.5 * 1 + 0.25 = 0.75
    assert rates.prefill_tokens_per_s == pytest.approx(200.0)


def test_decode_step_time_is_a_line_over_rows() -> None:
    rates = StepRates(weight=0.5)
    rates.observe(1, 1, 0.010)
    rates.observe(4, 4, 0.016)  # a + b * rows: a = 8 ms, b = 2 ms
    assert rates.decode_step_s(8) == pytest.approx(0.024)
    assert rates.decode_step_s(1) == pytest.approx(0.010)
    prediction = predict(EngineLoad(0, 7), rates, 10)  # 7 running + this one
    assert prediction.tpot_s == pytest.approx(0.024)
    assert rejection(prediction, SLO(tpot_s=0.030)) is None
    miss = rejection(prediction, SLO(tpot_s=0.020))
    assert miss is not None and miss.objective == "tpot"
    assert "time per output token 24 ms" in miss.message
    assert predict(EngineLoad(0, 5), rates, 10, num_seqs=3).tpot_s == pytest.approx(0.024)


def test_decode_step_time_from_one_batch_size_scales_up_only() -> None:
    rates = StepRates()
    for _ in range(3):
        rates.observe(4, 4, 0.020)
    assert rates.decode_step_s(2) == pytest.approx(0.020)  # no smaller than measured
    assert rates.decode_step_s(8) == pytest.approx(0.040)  # twice the rows
    assert rates.prefill_tokens_per_s is None  # all-decode steps say nothing of prefill


def test_ttft_is_checked_before_tpot() -> None:
    miss = rejection(Prediction(2.0, 0.5), SLO(ttft_s=1.0, tpot_s=0.1))
    assert miss is not None and miss.objective == "ttft"
    assert rejection(Prediction(2.0, 0.5), SLO()) is None  # no objectives: admit


def test_weight_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="weight"):
        StepRates(weight=0.0)


def test_engine_publishes_its_load_and_measures_its_rates(tiny_checkpoints) -> None:
    from kvserve.sampling_params import SamplingParams
    from tests.helpers import make_engine, random_prompts

    engine = make_engine(str(tiny_checkpoints["llama"]), max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(256, [5, 23, 40], seed=3)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    assert engine.scheduler.get_load() == EngineLoad(68, 0)
    assert engine.step_rates.prefill_tokens_per_s is None
    engine.step()  # 5 + 23 + the first 4 of 40 prompt tokens: two requests decode now
    assert engine.scheduler.get_load() == EngineLoad(36, 2)
    assert engine.step_rates.prefill_tokens_per_s is not None
    while engine.scheduler.get_load().num_queued_prefill_tokens:
        engine.step()
    assert engine.scheduler.get_load().num_decoding == 3
    assert engine.step_rates.decode_step_s(3) is None  # no all-decode step yet
    engine.step()
    assert engine.step_rates.decode_step_s(3) is not None
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.get_load() == EngineLoad(0, 0)
