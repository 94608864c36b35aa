"""Weighted canaries: which version of `name` one request runs on when its routing has weights.

    PUT /admin/adapters/sql/alias {"weights": {"3": 90, "4": 10}}

Each end user falls at a fixed point of [0, 1): the first 8 bytes of BLAKE2b over `name` and the user's id
(OpenAI's `user` field, else the header `registry.sticky_header`). The versions share [0, 1) in proportion
to their weights, oldest first, so one user stays on one version for as long as the weights stand, and
growing the newest version's share (10 -> 50 -> 100) only moves users onto it, never back and forth.
A request naming no user gets a random point: the proportions hold over many requests, not per user.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

from gateway.registry.catalog import AdapterRef

_SCALE = float(1 << 64)


def user_point(name: str, user: str) -> float:
    """Where `user` falls in [0, 1) for `name`: fixed for the pair, uniform over users."""
    digest = hashlib.blake2b(f"{name}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


class Split:
    """The versions of one name and their shares of [0, 1)."""

    __slots__ = ("name", "refs", "_edges")

    def __init__(self, name: str, refs: Sequence[AdapterRef], weights: Sequence[int]) -> None:
        if len(refs) != len(weights) or not refs or sum(weights) <= 0:
            raise ValueError("a split needs versions with positive total weight")
        total = sum(weights)
        edges, running = [], 0
        for w in weights[:-1]:
            running += w
            edges.append(running / total)
        self.name = name
        self.refs = tuple(refs)
        self._edges = edges  # upper bounds of each version's interval but the last

    def pick(self, user: str | None) -> AdapterRef:
        point = user_point(self.name, user) if user else random.random()
        return self.refs[bisect.bisect_right(self._edges, point)]
