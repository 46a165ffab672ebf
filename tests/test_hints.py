"""service.hints: the `high_self_influence` hint of a POST /influence answer (issue 22, item 8). The answer
on the real digits demo is tested in tests/test_demo_cli.py (train-17: every hit a flipped label)."""
from __future__ import annotations

from service.hints import MOST, TOP_SHARE, influence_hints, top_ranks


def _hits(ranks):
    return [{"id": f"train-{r}", "self_influence_rank": r} for r in ranks]


def test_top_ranks_is_the_top_tenth_at_least_one():
    assert TOP_SHARE == 0.10 and MOST == 0.5
    assert top_ranks(1500) == 150 and top_ranks(1501) == 151 and top_ranks(5) == 1 and top_ranks(1) == 1
    assert top_ranks(1500, 0.01) == 15


def test_more_than_half_of_the_hits_in_the_top_tenth_gives_the_hint():
    count = 1000  # top 10% = ranks 1..100
    hint, = influence_hints(_hits([1, 5, 100, 101, 7, 900]), count, "none")  # 4 of 6
    assert hint["code"] == "high_self_influence" and hint["suggestion"] == {"normalize": "train"}
    assert hint["in_top"] == 4 and hint["hits"] == 6 and hint["fraction"] == 4 / 6 and hint["top_ranks"] == 100
    assert "4 of the 6 hits are among the top 10%" in hint["message"] and "3 in the top 1%" in hint["message"]
    assert 'normalize="train"' in hint["message"]


def test_no_hint_at_half_or_below_for_normalised_answers_or_a_single_hit():
    count = 1000
    assert influence_hints(_hits([1, 2, 101, 500]), count, "none") == []  # exactly half is not "most"
    assert influence_hints(_hits([1, 2, 3, 4]), count, "train") == []  # normalised already
    assert influence_hints(_hits([1, 2, 3, 4]), count, "cosine") == []
    assert influence_hints(_hits([1]), count, "none") == []  # one hit says nothing about a tendency
    assert influence_hints([], count, "none") == []
    assert influence_hints([{"id": "a"}, {"id": "b"}], count, "none") == []  # ranks unknown: never guessed
