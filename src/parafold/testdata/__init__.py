"""Synthetic AlphaFold databases with planted protein families, for tests, demo and benchmarks.

`build_testdata(OUT)` writes the AlphaFold database layout of docs/layout.md under OUT with
real tool formats (FASTA, HH-suite ffindex, mmCIF), plus `queries.fasta` (one query per
family) and `truth.tsv` (the family of every sequence id), so search recall is measurable.
"""

from parafold.testdata.build import (
    HH_SINGLETON_CAP,
    LAYOUT,
    MARKER,
    TestdataSummary,
    build_testdata,
    read_testdata,
    read_truth,
)

__all__ = ["build_testdata", "read_testdata", "read_truth", "TestdataSummary", "LAYOUT",
           "MARKER", "HH_SINGLETON_CAP"]
