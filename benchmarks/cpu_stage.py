"""CPU-stage benchmark: one protein's searches sequential vs concurrent, then proteins/hour.

    .venv/bin/python benchmarks/cpu_stage.py --sequences 200000 --cpus 2

Builds (or reuses) a synthetic database set with `parafold.testdata.build_testdata`, then:
1. each search of one query alone (sequential, as stock AlphaFold runs them) and their sum;
2. the same searches concurrently (ParaFold), with the ratio to the slowest single search and to
   the critical path (jackhmmer UniRef90 then hhsearch, which must run one after the other);
3. every query through `featurize_many` with the whole budget, as proteins per hour.
4. with `--modes classic,mmseqs` (any of classic, mmseqs, single_sequence): every query through
   each MSA mode, proteins per hour and recall of planted family members side by side.

    .venv/bin/python benchmarks/cpu_stage.py --sequences 100000 --families 32 \
        --modes classic,mmseqs --skip-single
    .venv/bin/python benchmarks/cpu_stage.py --sequences 1000000 --families 256 --cpus 2 \
        --modes classic,mmseqs --skip-single --mmseqs-sensitivity 6.5,default   # issue 7's goal

Recall in part 4 counts the family members in the databases both modes search (uniref90,
mgnify, bfd, uniref30 and template chains; small_bfd is searched only by mmseqs' environmental
database, so its members are left out), found in a target's MSAs or template hits; unrelated is
the share of hits with no family. MMseqs2 databases are built (and indexed) once if missing;
that build time is printed apart from the search time.
Each measurement uses a fresh output and cache folder, so nothing is reused between them.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from parafold.inputs import Target, read_targets
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
    p.add_argument("--uniref90-redundancy", type=int, default=1,
                   help="unrelated uniref90 sequences in clusters of this many relatives, as "
                        "real UniRef90 within UniRef30 clusters (about 5); 1: all unrelated")
    p.add_argument("--cpus", type=int, default=default_cpus(), help="core budget")
    p.add_argument("--threads", type=int, default=1, help="threads per search in part 1-2")
    p.add_argument("--preset", default="full_dbs", choices=("full_dbs", "reduced_dbs"))
    p.add_argument("--modes", default="",
                   help="compare MSA modes, e.g. classic,mmseqs (part 4; default: skip)")
    p.add_argument("--skip-single", action="store_true",
                   help="skip parts 1-3 (one protein sequential/concurrent, classic throughput)")
    p.add_argument("--mmseqs-sensitivity", type=_sensitivities, default=(None,),
                   help="mmseqs -s in part 4, or several: 6.5,default (default: ColabFold's "
                        "--k-score seq:96,prof:80; older ColabFold used -s 8; lower is faster, "
                        "finds less); each is a row of its own")
    p.add_argument("--max-queries", type=int, default=0,
                   help="use only the first N queries in part 4 (0: all)")
    p.add_argument("--no-templates-too", action="store_true",
                   help="in part 4, each mode also without templates (--no-templates), a row "
                        "of its own")
    return p.parse_args()


def _sensitivities(text: str) -> tuple[float | None, ...]:
    return tuple(None if part.strip() == "default" else float(part)
                 for part in text.split(","))


def _hit_ids(msa_dir: Path) -> set[str]:
    """Sequence ids in a target's MSAs and template hits, whatever the mode wrote."""
    from alphafold.data import parsers

    ids: set[str] = set()
    for path in msa_dir.glob("*.sto"):
        ids |= {d.split("/")[0] for d in parsers.parse_stockholm(path.read_text()).descriptions}
    for path in msa_dir.glob("*.a3m"):
        ids |= {d.split()[0] for d in parsers.parse_a3m(path.read_text()).descriptions if d}
    for path in msa_dir.glob("*.m8"):
        ids |= {row.split("\t")[1] for row in path.read_text().splitlines() if row}
    for path in msa_dir.glob("*.hhr"):
        blocks = path.read_text().split("\n\n")
        for line in blocks[1].splitlines()[1:] if len(blocks) > 1 else []:
            fields = line.split()
            if len(line) > 40 and float(line[34:].split()[0]) >= 20.0:
                ids.add(fields[1])
    ids.discard("query")
    return ids


def _recall(out: Path, targets: list[Target], truth: dict[str, str]) -> tuple[float, float]:
    """(mean recall over targets of searchable family members, share of unrelated hits)."""
    by_family: dict[str, set[str]] = {}
    for seq_id, family in truth.items():
        if family and not seq_id.startswith(("PDBMSA", "SBFD")):
            by_family.setdefault(family, set()).add(seq_id)
    recalls, hits_total, unrelated = [], 0, 0
    for t in targets:
        members = by_family.get(t.id.split("_")[0], set())
        hits = _hit_ids(out / t.name / "msas") if (out / t.name / "msas").is_dir() else set()
        recalls.append(len(hits & members) / max(1, len(members)))
        hits_total += len(hits)
        unrelated += sum(1 for h in hits if truth.get(h, "") == "")
    return sum(recalls) / max(1, len(recalls)), unrelated / max(1, hits_total)


def _ensure_mmseqs(db: Path, cpus: int) -> float:
    """Build the MMseqs2 databases if the set predates them; returns the seconds it took."""
    if (db / "mmseqs" / "env_db.dbtype").is_file():
        return 0.0
    from parafold.testdata.mmseqs_db import build_mmseqs_databases

    start = time.monotonic()
    build_mmseqs_databases(db, threads=cpus)
    return time.monotonic() - start


def compare_modes(db: Path, modes: list[str], queries: list[Target], args: argparse.Namespace,
                  work: Path) -> None:
    from parafold.testdata import read_truth

    truth = read_truth(db / "truth.tsv")
    if "mmseqs" in modes:
        built = _ensure_mmseqs(db, args.cpus)
        if built:
            print(f"\nMMseqs2 databases built and indexed in {built:.1f} s (once per set)")
    print(f"\nMSA modes, {len(queries)} proteins, {args.cpus} cores:")
    print(f"  {'mode':<16} {'wall s':>9} {'proteins/h':>11} {'recall':>7} {'unrelated':>9} "
          f"{'ok':>5}")
    rows: dict[str, tuple[float, float]] = {}
    runs = [(mode, sens, templates) for mode in modes
            for sens in (args.mmseqs_sensitivity if mode == "mmseqs" else (None,))
            for templates in ((True, False) if args.no_templates_too else (True,))]
    for mode, sens, templates in runs:
        label = mode if mode != "mmseqs" or len(args.mmseqs_sensitivity) == 1 else (
            f"mmseqs -s {sens:g}" if sens is not None else "mmseqs k-score")
        label += "" if templates else " no-tpl"
        dbs = find_databases(db, args.preset, msa_mode=mode, templates=templates)
        settings = SearchSettings(preset=args.preset, msa_mode=mode, mmseqs_sensitivity=sens,
                                  use_templates=templates)
        out = work / f"mode-{label.replace(' ', '_')}"
        start = time.monotonic()
        outcomes = featurize_many(queries, out_dir=out, databases=dbs, settings=settings,
                                  cpus=args.cpus, cache_dir=work / f"cache-{out.name}")
        wall = time.monotonic() - start
        ok = sum(o.ok for o in outcomes)
        recall, unrelated = _recall(out, queries, truth)
        rows[label] = (ok * 3600 / wall, recall)
        print(f"  {label:<16} {wall:9.1f} {rows[label][0]:11.0f} {recall:7.3f} "
              f"{unrelated:9.3f} {ok:>2}/{len(outcomes)}")
    for label, (rate, recall) in rows.items():
        base = "classic" + (" no-tpl" if label.endswith(" no-tpl") else "")
        if base in rows and label.startswith("mmseqs"):
            speed = rate / rows[base][0]
            rel = recall / max(rows[base][1], 1e-9)
            print(f"  {label} vs {base}: {speed:.1f}x proteins/hour (goal >= 20x), recall "
                  f"{rel:.1%} of {base} (goal >= 95%)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _args()
    name = f"parafold-bench-{args.sequences}-{args.families}"
    if args.uniref90_redundancy != 1:
        name += f"-r{args.uniref90_redundancy}"
    db = args.db or Path(tempfile.gettempdir()) / name
    t0 = time.monotonic()
    summary = build_testdata(db, families=args.families, sequences=args.sequences,
                             uniref90_redundancy=args.uniref90_redundancy)
    print(f"database: {db} ({summary.counts}), ready in {time.monotonic() - t0:.1f} s"
          f"{' (reused)' if summary.reused else ''}")
    dbs = find_databases(db, args.preset).fingerprinted()
    settings = SearchSettings(preset=args.preset)
    queries = read_targets(db / "queries.fasta").targets
    query = max(queries, key=lambda t: t.length)
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        work = Path(tmp)
        modes = [m for m in args.modes.split(",") if m]
        if args.skip_single:
            chosen = list(queries[: args.max_queries] if args.max_queries else queries)
            compare_modes(db, modes, chosen, args, work)
            return
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
        if modes:
            chosen = list(queries[: args.max_queries] if args.max_queries else queries)
            compare_modes(db, modes, chosen, args, work)


if __name__ == "__main__":
    main()
