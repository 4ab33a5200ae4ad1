"""The order of samples: a seeded bijection over chunks and a deterministic mixture schedule.

Both are pure functions of their inputs, which is what lets a run resume (or another rank
start) anywhere by knowing only the global sample index.

Why not the reference's "magic prime" (start = (phi*p * i^3) mod p with p the largest prime
p = 2 mod 3 below the chunk count)? It never visits the chunks above p, and on small data
there may be no suitable prime at all. A Feistel network is a bijection on any power-of-two
domain; cycle walking (re-applying it while the result is >= n) restricts it to exactly
{0..n-1} for any n >= 1, with fewer than four applications on average.
"""

import math
from collections.abc import Sequence
from fractions import Fraction

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast 64-bit hash with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_key(parts: Sequence[int]) -> int:
    """One 64-bit key from a tuple of integers (seed, source, epoch, ...)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _mix64(h ^ (int(p) & _MASK64))
    return h


class FeistelPermutation:
    """A seeded bijection of {0, ..., n-1}: perm(i) for i < n visits every value once."""

    ROUNDS = 6

    def __init__(self, n: int, key: Sequence[int]) -> None:
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2  # two equal halves: the domain is 4**half >= n
        self.mask = (1 << self.half) - 1
        base = hash_key(key)
        self.round_keys = [_mix64(base ^ r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(k ^ right) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside 0..{self.n - 1}")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: stays a bijection on {0..n-1}
            x = self._encrypt(x)
        return x


class MixtureSchedule:
    """Maps a global sample index to (source, index within that source) by fixed weights.

    The weights become integer counts c_j over a period R = sum c_j (exact for rational
    weights up to a resolution of 1/`resolution`: 1/1000, or 1/100000 for more than 10
    sources, such as a build's components split by source, where shares under 1/1000 are
    common and each source gets at least one count). One period is laid out by smooth weighted
    round robin, so sources interleave evenly instead of in long runs; the layout repeats.
    Sample g falls at position g mod R of period g // R; its source's own index is the number
    of earlier samples of that source, so every source is read densely as 0, 1, 2, ...
    """

    def __init__(self, weights: Sequence[float], resolution: int | None = None) -> None:
        if not weights or any(not (w > 0) for w in weights):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        if resolution is None:
            resolution = 1000 if len(weights) <= 10 else 100_000
        counts = _integer_counts(weights, resolution)
        g = math.gcd(*counts)
        self.counts = [c // g for c in counts]
        self.period = sum(self.counts)
        self.pattern: list[int] = []
        self.rank_in_period: list[int] = []
        current = [0] * len(self.counts)
        seen = [0] * len(self.counts)
        for _ in range(self.period):
            for j, c in enumerate(self.counts):
                current[j] += c
            j = max(range(len(current)), key=lambda i: (current[i], -i))
            current[j] -= self.period
            self.pattern.append(j)
            self.rank_in_period.append(seen[j])
            seen[j] += 1

    @property
    def fractions(self) -> list[float]:
        """The realised share of each source."""
        return [c / self.period for c in self.counts]

    def locate(self, g: int) -> tuple[int, int]:
        """(source, index within the source) of global sample g."""
        block, pos = divmod(g, self.period)
        j = self.pattern[pos]
        return j, block * self.counts[j] + self.rank_in_period[pos]


def _integer_counts(weights: Sequence[float], resolution: int) -> list[int]:
    """Largest-remainder rounding of the normalised weights to integers summing to resolution,
    keeping every source at least 1."""
    if len(weights) == 1:
        return [1]
    total = sum(Fraction(w).limit_denominator(10**9) for w in weights)
    exact = [Fraction(w).limit_denominator(10**9) / total * resolution for w in weights]
    counts = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in order[: max(0, resolution - sum(counts))]:
        counts[i] += 1
    return counts
