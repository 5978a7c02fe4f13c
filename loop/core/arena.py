"""Ratings of versions from blind-arena votes: a Bradley-Terry fit with a small prior.

Each vote is one game between two versions (``winner`` is "a", "b" or "tie"; a tie is half a win
for each side). Bradley-Terry gives every version a strength ``p`` with
``P(i beats j) = p_i / (p_i + p_j)``; it is fitted by Hunter's MM algorithm (2004), which needs no
step size and increases the likelihood at every iteration.

Why a prior: with raw maximum likelihood, a version that won its only game has infinite strength,
and one that never played has none at all. Every version therefore also plays ``prior_games``
virtual games against a fixed anchor of strength 1, half of them won. That pulls versions with few
votes towards the middle and costs nothing once real votes accumulate.

Ratings are reported on the familiar Elo scale, ``1000 + 400 * log10(p)``: 1000 is the anchor and
a 400-point gap means 10:1 odds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

BASE_RATING = 1000.0
SCALE = 400.0


def ratings(
    votes: Iterable[Mapping[str, Any]],
    *,
    versions: Iterable[str] = (),
    prior_games: float = 2.0,
    iterations: int = 500,
    tol: float = 1e-9,
) -> dict[str, dict[str, Any]]:
    """Ratings per version from arena votes (rows of ``Store.arena_votes()``).

    Returns ``{version: {"rating", "games", "wins", "losses", "ties", "score"}}``; ``versions``
    adds versions with no votes yet (they get the anchor's rating), so a table can list them all.
    """
    wins: dict[str, float] = defaultdict(float)  # ties counted as half a win
    pair_games: dict[tuple[str, str], float] = defaultdict(float)
    stats: dict[str, dict[str, Any]] = {}

    def stat(v: str) -> dict[str, Any]:
        return stats.setdefault(v, {"games": 0, "wins": 0, "losses": 0, "ties": 0})

    for vid in versions:
        stat(vid)
    for vote in votes:
        a, b, winner = vote["version_a"], vote["version_b"], vote["winner"]
        if a == b:
            continue  # a version against itself says nothing about either
        sa, sb = stat(a), stat(b)
        sa["games"] += 1
        sb["games"] += 1
        if winner == "a":
            wins[a] += 1.0
            sa["wins"] += 1
            sb["losses"] += 1
        elif winner == "b":
            wins[b] += 1.0
            sb["wins"] += 1
            sa["losses"] += 1
        elif winner == "tie":
            wins[a] += 0.5
            wins[b] += 0.5
            sa["ties"] += 1
            sb["ties"] += 1
        else:
            raise ValueError(f"winner must be 'a', 'b' or 'tie', got {winner!r}")
        pair_games[tuple(sorted((a, b)))] += 1.0

    opponents: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (a, b), n in pair_games.items():
        opponents[a].append((b, n))
        opponents[b].append((a, n))

    strength = {v: 1.0 for v in stats}
    for _ in range(iterations):
        biggest_change = 0.0
        new = {}
        for v in stats:
            # MM update: p_v = W_v / sum_j n_vj / (p_v + p_j), the anchor included as opponent j.
            numer = wins[v] + prior_games / 2.0
            denom = prior_games / (strength[v] + 1.0)
            for other, n in opponents[v]:
                denom += n / (strength[v] + strength[other])
            new[v] = numer / denom
            biggest_change = max(biggest_change, abs(math.log(new[v]) - math.log(strength[v])))
        strength = new
        if biggest_change < tol:
            break

    out = {}
    for v, s in stats.items():
        out[v] = {
            "rating": round(BASE_RATING + SCALE * math.log10(strength[v]), 1),
            "games": s["games"],
            "wins": s["wins"],
            "losses": s["losses"],
            "ties": s["ties"],
            "score": s["wins"] + 0.5 * s["ties"],
        }
    return out


def win_probability(rating_a: float, rating_b: float) -> float:
    """P(a beats b) implied by two ratings on this module's scale."""
    return 1.0 / (1.0 + 10 ** ((rating_b - rating_a) / SCALE))


def leaderboard(table: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(version, stats) sorted best first; ties in rating broken by games played, then id."""
    return sorted(table.items(), key=lambda kv: (-kv[1]["rating"], -kv[1]["games"], kv[0]))


def ratings_from_store(store: Any, versions: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    return ratings(store.arena_votes(), versions=versions)
