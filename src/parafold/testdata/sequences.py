"""Random proteins and their planted relatives, with the alignment that relates them kept.

Members are made from an ancestor by BLOSUM62-biased substitutions and short indels, and each
one remembers which ancestor column every residue sits in. That known alignment is what the
HH-suite databases are built from, so no aligner has to rediscover it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AMINO_ACIDS",
    "AlignedSeq",
    "random_sequence",
    "random_sequences",
    "redundant_sequences",
    "mutate",
    "to_a3m",
]

AMINO_ACIDS = "ARNDCQEGHILKMFPSTWYV"
# UniProtKB/Swiss-Prot amino-acid composition (percent), in AMINO_ACIDS order: random
# sequences then look like proteins to the tools' composition corrections.
_COMPOSITION = (8.25, 5.53, 4.06, 5.45, 1.37, 3.93, 6.75, 7.07, 2.27, 5.96,
                9.66, 5.84, 2.42, 3.86, 4.70, 6.56, 5.34, 1.08, 2.92, 6.87)
_LETTERS = np.frombuffer(AMINO_ACIDS.encode("ascii"), dtype=np.uint8)
_INDEX = {aa: i for i, aa in enumerate(AMINO_ACIDS)}
# Indel events per substitution; a few per divergent member, as in real families.
_INDEL_PER_SUBSTITUTION = 0.06


def background() -> np.ndarray:
    freqs = np.asarray(_COMPOSITION, dtype=np.float64)
    return freqs / freqs.sum()


@functools.lru_cache(maxsize=1)
def _substitution_probs() -> np.ndarray:
    """P(b | a, a mutates) from BLOSUM62: target frequency q_b * 2^(S_ab / 2), diagonal removed.

    BLOSUM62 scores are half-bits of p_ab / (q_a q_b), so this recovers the substitution
    pattern the tools' own scoring expects, which makes distant members findable but not free.
    """
    from Bio.Align import substitution_matrices

    blosum = substitution_matrices.load("BLOSUM62")
    bg = background()
    probs = np.empty((20, 20))
    for i, a in enumerate(AMINO_ACIDS):
        for j, b in enumerate(AMINO_ACIDS):
            probs[i, j] = 0.0 if i == j else bg[j] * 2.0 ** (blosum[a, b] / 2.0)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def random_sequence(rng: np.random.Generator, length: int) -> str:
    codes = rng.choice(20, size=length, p=background())
    return _LETTERS[codes].tobytes().decode("ascii")


def random_sequences(rng: np.random.Generator, count: int, *, min_len: int, max_len: int,
                     chunk: int = 8192) -> Iterator[str]:
    """`count` unrelated sequences, drawn a chunk at a time so a million never sit in memory."""
    bg = background()
    done = 0
    while done < count:
        n = min(chunk, count - done)
        lengths = rng.integers(min_len, max_len + 1, size=n)
        letters = _LETTERS[rng.choice(20, size=int(lengths.sum()), p=bg)].tobytes().decode("ascii")
        ends = np.cumsum(lengths)
        start = 0
        for end in ends.tolist():
            yield letters[start:end]
            start = end
        done += n


def redundant_sequences(rng: np.random.Generator, count: int, *, min_len: int, max_len: int,
                        per_cluster: int, identity: tuple[float, float] = (0.7, 0.95)
                        ) -> Iterator[str]:
    """`count` background sequences in clusters of `per_cluster` relatives of one random
    ancestor (`identity` to it, substitutions only): the redundancy of UniRef90 that UniRef30's
    profile clusters fold away (roughly five UniRef90 entries per UniRef30 cluster in the
    2022 releases). 1: all unrelated."""
    if per_cluster <= 1:
        yield from random_sequences(rng, count, min_len=min_len, max_len=max_len)
        return
    bg = background()
    made = 0
    for ancestor in random_sequences(rng, -(-count // per_cluster), min_len=min_len,
                                     max_len=max_len):
        codes = np.frombuffer(ancestor.encode("ascii"), dtype=np.uint8)
        n = min(per_cluster, count - made)
        keep = rng.random((n, codes.size)) < rng.uniform(*identity, size=(n, 1))
        fresh = _LETTERS[rng.choice(20, size=(n, codes.size), p=bg)]
        for row in np.where(keep, codes, fresh):
            yield row.tobytes().decode("ascii")
        made += n


@dataclass(frozen=True, slots=True)
class AlignedSeq:
    """A family member as placed on its ancestor's columns.

    `match[i]` is the residue in ancestor column i or '-' where it was deleted; `inserts[i]`
    holds residues inserted before column i (`inserts[len(match)]`: after the last column).
    """

    match: str
    inserts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.inserts) != len(self.match) + 1:
            raise ValueError("inserts must have one slot more than match columns")

    @property
    def sequence(self) -> str:
        parts = [self.inserts[i] + (c if c != "-" else "") for i, c in enumerate(self.match)]
        return "".join(parts) + self.inserts[-1]

    def identity_to(self, ancestor: str) -> float:
        """Identical residues over ancestor columns (what the identity range refers to)."""
        same = sum(a == b for a, b in zip(self.match, ancestor, strict=True))
        return same / len(ancestor)


def mutate(rng: np.random.Generator, ancestor: str, identity: float) -> AlignedSeq:
    """A relative of `ancestor` with about `identity` of its columns unchanged."""
    length = len(ancestor)
    probs = _substitution_probs()
    match = list(ancestor)
    n_sub = round((1.0 - identity) * length)
    for pos in rng.choice(length, size=min(n_sub, length), replace=False).tolist():
        match[pos] = AMINO_ACIDS[rng.choice(20, p=probs[_INDEX[match[pos]]])]
    inserts = [""] * (length + 1)
    for _ in range(int(rng.poisson(n_sub * _INDEL_PER_SUBSTITUTION))):
        size = int(min(rng.geometric(0.5), 4))
        start = int(rng.integers(1, max(2, length - size - 1)))
        if rng.random() < 0.5:
            for pos in range(start, min(start + size, length - 1)):
                match[pos] = "-"
        else:
            inserts[start] += random_sequence(rng, size)
    return AlignedSeq("".join(match), tuple(inserts))


def to_a3m(entries: Sequence[tuple[str, AlignedSeq]]) -> str:
    """An A3M alignment of members of one family; the first entry is the master.

    Columns where the master has a residue are match states (upper case, '-' for gaps);
    every other residue is an insertion (lower case), as hhmake and hhblits read A3M.
    """
    if not entries:
        raise ValueError("an A3M needs at least one sequence")
    ncols = len(entries[0][1].match)
    widths = [max(len(s.inserts[i]) for _, s in entries) for i in range(ncols + 1)]

    def full_row(seq: AlignedSeq) -> str:
        parts = [seq.inserts[i].ljust(widths[i], "-") + seq.match[i] for i in range(ncols)]
        return "".join(parts) + seq.inserts[ncols].ljust(widths[ncols], "-")

    rows = [full_row(seq) for _, seq in entries]
    keep = [c != "-" for c in rows[0]]
    lines = []
    for (header, _), row in zip(entries, rows, strict=True):
        a3m = "".join(c.upper() if k else c.lower() for c, k in zip(row, keep, strict=True)
                      if k or c != "-")
        lines.append(f">{header}\n{a3m}\n")
    return "".join(lines)
