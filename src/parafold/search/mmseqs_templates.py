"""MMseqs2 template hits (`pdb_hits.m8`) as AlphaFold `TemplateHit`s, then template features.

Each m8 row carries the hit's start positions, CIGAR and whole target sequence. The aligned
query and hit strings are rebuilt from the real query sequence (the profile that searched is
not the query), so AlphaFold's featurizer maps residues exactly as it does for an hhsearch hit
and realigns with kalign where the mmCIF chain differs from the PDB sequence.
"""

from __future__ import annotations

import re

from alphafold.data import parsers

from parafold.errors import FeatureError

__all__ = ["parse_m8_hits", "hit_from_m8_row"]

_CIGAR = re.compile(r"(\d+)([MID])")
_COLUMNS = 14  # M8_FIELDS in mmseqs.py


def _column(seq: str, pos: int, advances: bool, aligned: list[str], idx: list[int],
            row_name: str, side: str) -> int:
    """One alignment column of one side: its residue (or a gap) and index (or -1) appended;
    returns the next position in `seq`."""
    if not advances:
        aligned.append("-")
        idx.append(-1)
        return pos
    if pos >= len(seq):
        raise FeatureError(f"{row_name}: alignment past the {side}")
    aligned.append(seq[pos])
    idx.append(pos)
    return pos + 1


def hit_from_m8_row(index: int, row: str, query_sequence: str) -> parsers.TemplateHit:
    """One convertalis row -> TemplateHit (sum_probs: the bit score, which orders the hits).

    CIGAR letters follow MMseqs2: M both advance, I a query residue against a gap, D a target
    residue against a gap.

    Raises:
        FeatureError: a malformed row, or one whose alignment leaves the query or target.
    """
    fields = row.rstrip("\n").split("\t")
    if len(fields) != _COLUMNS:
        raise FeatureError(f"m8 row {index}: {len(fields)} columns, expected {_COLUMNS}")
    target, cigar, tseq = fields[1], fields[12], fields[13]
    try:
        qstart, tstart, bits = int(fields[6]) - 1, int(fields[8]) - 1, float(fields[11])
    except ValueError as exc:
        raise FeatureError(f"m8 row {index} ({target}): {exc}") from exc
    if qstart < 0 or tstart < 0:
        raise FeatureError(f"m8 row {index} ({target}): start positions are 1-based")
    q_aln, t_aln, q_idx, t_idx = [], [], [], []
    qi, ti, aligned = qstart, tstart, 0
    row_name = f"m8 row {index} ({target})"
    for count, op in _CIGAR.findall(cigar):
        for _ in range(int(count)):
            qi = _column(query_sequence, qi, op in "MI", q_aln, q_idx, row_name, "query")
            ti = _column(tseq, ti, op in "MD", t_aln, t_idx, row_name, "target")
            aligned += op == "M"
    return parsers.TemplateHit(index=index, name=f"{target} mmseqs2 hit", aligned_cols=aligned,
                               sum_probs=bits, query="".join(q_aln),
                               hit_sequence="".join(t_aln), indices_query=q_idx,
                               indices_hit=t_idx)


def parse_m8_hits(text: str, query_sequence: str) -> list[parsers.TemplateHit]:
    """Every row of one query's `pdb_hits.m8` as a TemplateHit, in file order."""
    rows = [r for r in text.splitlines() if r.strip()]
    return [hit_from_m8_row(i, r, query_sequence) for i, r in enumerate(rows)]
