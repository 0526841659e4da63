"""CPU-stage benchmark: one protein's searches sequential vs concurrent, then proteins/hour.

    .venv/bin/python benchmarks/cpu_stage.py --sequences 200000 --cpus 2

Builds (or reuses) a synthetic database set with `parafold.testdata.build_testdata`, then:
1. each search of one query alone (sequential, as stock AlphaFold runs them) and their sum;
2. the same searches concurrently (ParaFold), with the ratio to the slowest single search and to
   the critical path (jackhmmer UniRef90 then hhsearch, which must run one after the other);
3. every query through `featurize_many` with the whole budget, as proteins per hour.
Each measurement uses a fresh output and cache folder, so nothing is reused between them.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from parafold.inputs import read_targets
from parafold.search.budget import SEARCHES_PER_PROTEIN, CpuBudget, default_cpus
from parafold.search.databases import find_databases
from parafold.search.msa_search import run_searches
from parafold.search.scheduler import featurize_many
from parafold.search.settings import SearchSettings
from parafold.testdata import build_testdata

logger = logging.getLogger("cpu_stage")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=200_000,
                   help="total sequences in the synthetic set (1000000 works; build takes longer)")
    p.add_argument("--families", type=int, default=8, help="planted families = queries")
    p.add_argument("--db", type=Path, default=None, help="database folder (built if needed)")
    p.add_argument("--cpus", type=int, default=default_cpus(), help="core budget")
    p.add_argument("--threads", type=int, default=1, help="threads per search in part 1-2")
    p.add_argument("--preset", default="full_dbs", choices=("full_dbs", "reduced_dbs"))
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _args()
    db = args.db or Path(tempfile.gettempdir()) / f"parafold-bench-{args.sequences}-{args.families}"
    t0 = time.monotonic()
    summary = build_testdata(db, families=args.families, sequences=args.sequences)
    print(f"database: {db} ({summary.counts}), ready in {time.monotonic() - t0:.1f} s"
          f"{' (reused)' if summary.reused else ''}")
    dbs = find_databases(db, args.preset).fingerprinted()
    settings = SearchSettings(preset=args.preset)
    queries = read_targets(db / "queries.fasta").targets
    query = max(queries, key=lambda t: t.length)
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        work = Path(tmp)
        budget = CpuBudget(SEARCHES_PER_PROTEIN * args.threads)
        seq = run_searches(query.sequence, work / "seq" / "msas", databases=dbs,
                           settings=settings, budget=budget, threads=args.threads,
                           concurrent=False)
        con = run_searches(query.sequence, work / "con" / "msas", databases=dbs,
                           settings=settings, budget=budget, threads=args.threads,
                           concurrent=True)
        print(f"\none protein ({query.id}, {query.length} residues), {args.threads} thread(s) "
              "per search:")
        walls = {t.step: t.wall_s for t in seq.timings}
        for t in seq.timings:
            print(f"  {t.step:<24} {t.wall_s:8.2f} s wall {t.cpu_s:8.2f} s CPU")
        slowest = max(walls.values())
        bfd_step = "jackhmmer_small_bfd" if args.preset == "reduced_dbs" else "hhblits_bfd_uniref30"
        stream = max(walls["jackhmmer_uniref90"] + walls["hhsearch_pdb70"],
                     walls["jackhmmer_mgnify"], walls[bfd_step])
        print(f"  sequential (sum)         {seq.wall_s:8.2f} s")
        print(f"  concurrent               {con.wall_s:8.2f} s   "
              f"speedup {seq.wall_s / con.wall_s:.2f}x")
        print(f"  concurrent / slowest single search  {con.wall_s / slowest:.2f} "
              f"(goal <= 1.2)")
        print(f"  concurrent / slowest stream (uniref90 then hhsearch is one stream) "
              f"{con.wall_s / stream:.2f}")
        start = time.monotonic()
        outcomes = featurize_many(queries, out_dir=work / "many", databases=dbs,
                                  settings=settings, cpus=args.cpus, cache_dir=work / "cache")
        wall = time.monotonic() - start
        ok = sum(o.ok for o in outcomes)
        print(f"\n{ok}/{len(outcomes)} proteins, {args.cpus} cores, whole budget: {wall:.1f} s, "
              f"{ok * 3600 / wall:.0f} proteins/hour")


if __name__ == "__main__":
    main()
