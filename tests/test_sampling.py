import numpy as np
import pytest

from llamazip.runtime.sampling import Sampler, SamplingParams

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0, 2.9])


def _draws(params: SamplingParams, n=4000, history=()):
    sampler = Sampler(params)
    return np.bincount([sampler.sample(LOGITS, history) for _ in range(n)], minlength=len(LOGITS))


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0)).sample(LOGITS) == 1


def test_same_seed_same_draws_and_other_seeds_differ():
    def run(seed):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        return [s.sample(LOGITS) for _ in range(50)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_plain_temperature_follows_softmax():
    params = SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    counts = _draws(params, n=20000)
    expected = np.exp(LOGITS / 0.7) / np.exp(LOGITS / 0.7).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.015)


def test_top_k_keeps_only_the_best():
    counts = _draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=2))
    assert set(np.nonzero(counts)[0]) == {1, 5}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities of tokens 1, 5, 2 at T=1 are ~0.35, 0.32, 0.21: 0.6 needs the first two
    counts = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0, seed=3))
    assert set(np.nonzero(counts)[0]) == {1, 5}


def test_min_p_drops_unlikely_tokens():
    # token 2 has e^-0.5 ~ 0.61 of the best token's probability; 0 has e^-2 ~ 0.14
    counts = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=4))
    assert set(np.nonzero(counts)[0]) == {1, 2, 5}


def test_repeat_penalty_demotes_recent_tokens():
    params = SamplingParams(temperature=0, repeat_penalty=2.0)
    assert Sampler(params).sample(LOGITS, history=[1]) == 5  # 3.0 / 2 < 2.9
    assert Sampler(params).sample(LOGITS, history=[7 % 6, 5]) == 2


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
                                 dict(repeat_penalty=0.0), dict(temperature=float("nan"))])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Sampler(SamplingParams(**bad))


def test_presence_and_frequency_penalties_look_at_generated_tokens():
    params = SamplingParams(temperature=0, presence_penalty=0.2)
    assert Sampler(params).sample(LOGITS, history=[1], generated=[1]) == 5  # 3.0 - 0.2 < 2.9
    assert Sampler(params).sample(LOGITS, history=[1], generated=[]) == 1  # the prompt is not penalized
    params = SamplingParams(temperature=0, frequency_penalty=0.5)
    assert Sampler(params).sample(LOGITS, generated=[5, 1, 1]) == 2  # 3.0 - 1.0 and 2.9 - 0.5 < 2.5
