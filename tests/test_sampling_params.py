"""SamplingParams: every bad value is rejected with a message that names its field."""

import math

import pytest

from llmctl.errors import InvalidRequestError, LlmctlError
from llmctl.sampling_params import SamplingParams

BAD_VALUES = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", -1), ("seed", 2**64), ("seed", "42"),
    ("max_tokens", 0), ("max_tokens", 3.0),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 21),
    ("prompt_logprobs", 21), ("prompt_logprobs", -3),
    ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", 7),
    ("output_kind", "final_only"), ("output_kind", 2),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_bad_value_is_rejected_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert str(err.value).startswith(f"{field}:")
    assert isinstance(err.value, LlmctlError) and err.value.status_code == 400


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(InvalidRequestError, match="min_tokens: must not exceed max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5


def test_defaults_and_normalization():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (1, 1.0, 1.0, -1, 16)
    assert not params.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_stop_token_ids_with_eos_and_ignore_eos():
    assert SamplingParams(stop_token_ids=[7, 2]).all_stop_token_ids(2) == [2, 7]
    assert SamplingParams(stop_token_ids=[7], ignore_eos=True).all_stop_token_ids(2) == [7]
    assert SamplingParams().all_stop_token_ids(None) == []
    assert SamplingParams(stop_token_ids=[5]).all_stop_token_ids([1, 2]) == [1, 2, 5]


def test_sample_seeds_differ_per_sample_and_stay_none_unseeded():
    params = SamplingParams(n=3, seed=10)
    assert [params.sample_seed(i) for i in range(3)] == [10, 11, 12]
    assert SamplingParams(seed=2**64 - 1).sample_seed(1) == 0
    assert SamplingParams(n=2).sample_seed(1) is None
