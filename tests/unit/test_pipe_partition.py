"""Partitioners: uniform counts, parameter balance (against brute force), type regex, errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexspeed.pipe.partition import partition_balanced, partition_by_type, partition_layers, partition_uniform


def _parts(bounds: list[int], weights: list[float]) -> list[float]:
    return [sum(weights[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]


def test_uniform_gives_the_first_stages_the_extra_layers():
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_uniform(8, 4) == [0, 2, 4, 6, 8]
    assert partition_uniform(3, 3) == [0, 1, 2, 3]


def test_balanced_puts_a_heavy_layer_alone():
    assert partition_balanced([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [0, 1, 11]
    assert partition_balanced([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10], 2) == [0, 10, 11]


def test_balanced_breaks_ties_by_layer_count():
    # activations (0 parameters) are spread so no stage gets a long tail of them
    assert partition_balanced([5, 0, 0, 5], 2) == [0, 2, 4]
    assert partition_balanced([0, 0, 0, 0], 2) == [0, 2, 4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=8), st.integers(1, 4))
def test_balanced_is_optimal_against_brute_force(weights, parts):
    parts = min(parts, len(weights))
    bounds = partition_balanced(weights, parts)
    assert bounds[0] == 0 and bounds[-1] == len(weights) and len(bounds) == parts + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))  # every stage non-empty
    best = min(max(_parts([0, *cuts, len(weights)], weights))
               for cuts in itertools.combinations(range(1, len(weights)), parts - 1))
    assert max(_parts(bounds, weights)) == best


def test_parameters_method_balances_a_transformer_like_stack():
    # embedding, 6 equal blocks, a final norm, a head as large as the embedding
    counts = [4096, *[1000] * 6, 64, 4096]
    bounds = partition_layers("parameters", 3, param_counts=counts, type_names=["x"] * len(counts))
    loads = _parts(bounds, counts)
    assert max(loads) == min(max(_parts([0, a, b, len(counts)], counts))
                             for a, b in itertools.combinations(range(1, len(counts)), 2))
    assert max(loads) / (sum(counts) / 3) < 1.25


def test_type_regex_balances_matching_layers():
    names = ["Embedding", "Block", "Block", "Block", "Block", "LayerNorm", "Linear"]
    bounds = partition_by_type(names, "block", 2)  # case-insensitive
    per_stage = [sum(1 for n in names[bounds[i]:bounds[i + 1]] if n == "Block") for i in range(2)]
    assert per_stage == [2, 2]
    bounds = partition_layers("type:^Block$", 4, param_counts=[0] * 7, type_names=names)
    assert [sum(1 for n in names[bounds[i]:bounds[i + 1]] if n == "Block") for i in range(4)] == [1, 1, 1, 1]


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"partition_method='nope'.*'parameters'"):
        partition_layers("nope", 2, param_counts=[1, 1], type_names=["a", "b"])
    with pytest.raises(ValueError, match=r"3 layers into 4 pipeline stages.*at most 3"):
        partition_uniform(3, 4)
    with pytest.raises(ValueError, match=r"matches 1 layer\(s\) but there are 2 stages.*\['Block', 'Linear'\]"):
        partition_by_type(["Block", "Linear"], "Block", 2)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        partition_by_type(["Block", "Linear"], "(", 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        partition_balanced([1, -1], 1)
