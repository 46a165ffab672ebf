"""Hints in a POST /influence answer: what a reader of the hits should know before trusting them.

`high_self_influence`: raw TracIn scores grow with the training example's gradient norm, so the
examples with the largest self-influence (mislabeled, rare or atypical ones) come out on top of many
queries whatever the query is (issue 22: on the digits demo all 20 proponents and opponents of
train-17 are flipped labels). When more than half of the hits returned sit in the top 10% of the
training set by exact self-influence, the answer says so and names the normalised view that discounts
them (`normalize = "train"`: score / ||g(train)||). The raw score stays the API's default: it is the
first-order effect of training on the example on the query's loss (TracIn's definition); normalising
changes the question to "which similar examples support this prediction".

Why the top 10% and not the top 1%: measured on the digits demo (`tracin demo`, 1,500 examples, 10% of
the labels flipped), over its first 40 held-out queries, the share of hits in the top 10% is 0.83 on
average for raw scores (39 of 40 answers above one half) and 0.21 with normalize=train (0 of 40); in
the top 1% it is 0.13 raw (no answer above one half, train-17's hits have ranks 7..126) against 0.03.
An answer unrelated to self-influence would have 10% of its hits there.
"""
from __future__ import annotations

import math
from typing import Any

#: the share of the training set, by descending self-influence, that counts as "top" (see the docstring)
TOP_SHARE = 0.10
#: more than this fraction of the hits in the top share gives the hint ("most")
MOST = 0.5


def top_ranks(count: int, share: float = TOP_SHARE) -> int:
    """How many training examples the top `share` holds (at least 1): ranks 1..top_ranks(count)."""
    return max(1, math.ceil(share * count))


def influence_hints(hits: list[dict[str, Any]], count: int, normalize: str) -> list[dict[str, Any]]:
    """Hints for an answer whose hits (proponents and opponents, each with its 1-based
    `self_influence_rank` among `count` training examples) were ranked with `normalize`.

    Returns [] or [{"code": "high_self_influence", "message", "fraction" (hits in the top 10%, 0..1),
    "in_top", "hits", "top_ranks", "suggestion": {"normalize": "train"}}]; only for raw scores
    (`normalize == "none"`) and at least two hits."""
    if normalize != "none" or len(hits) < 2 or count < 1:
        return []
    top = top_ranks(count)
    ranks = [hit["self_influence_rank"] for hit in hits if hit.get("self_influence_rank") is not None]
    in_top = sum(1 for rank in ranks if rank <= top)
    fraction = in_top / len(hits)
    if fraction <= MOST:
        return []
    return [{
        "code": "high_self_influence",
        "message": (f"{in_top} of the {len(hits)} hits are among the top {TOP_SHARE:.0%} of training examples by "
                    f"self-influence (rank <= {top}; {sum(1 for r in ranks if r <= top_ranks(count, 0.01))} in "
                    "the top 1%): often mislabeled or atypical examples, which raw TracIn puts first for many "
                    "queries. normalize=\"train\" (score / ||g(train)||) discounts them and shows the examples "
                    "most like this one; the raw score stays the first-order effect on the query's loss."),
        "fraction": fraction,
        "in_top": in_top,
        "hits": len(hits),
        "top_ranks": top,
        "suggestion": {"normalize": "train"},
    }]
