"""How `parafold run` starts on a metagenome-sized input: the work before the first search.

    .venv/bin/python benchmarks/startup_scale.py --targets 100000

Writes a FASTA of N random sequences (50-400 residues), then times what a run does before
it schedules anything: reading and checking the input (`read_targets`), registering every
target in a fresh ledger, reconciling the ledger with OUT (`pipeline._reconcile`: partial
files, search keys, features and predictions on disk), and registering again as a resumed
run does. Each step should grow linearly with N; the numbers are printed (and saved with
`--json`).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="save the numbers here")
    args = parser.parse_args()

    from parafold.fold.settings import ModelSettings
    from parafold.inputs import read_targets
    from parafold.ledger import Ledger
    from parafold.pipeline import RunSettings, _reconcile
    from parafold.search.settings import SearchSettings

    root = Path(tempfile.mkdtemp(prefix="parafold-startup-"))
    rng = random.Random(args.seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    with (root / "in.fasta").open("w") as fasta:
        for i in range(args.targets):
            length = rng.randint(50, 400)
            fasta.write(f">contig{i} metagenome\n{''.join(rng.choices(letters, k=length))}\n")
    settings = RunSettings(input=root / "in.fasta", out=root / "out", params_dir=root,
                           search=SearchSettings(msa_mode="single_sequence"),
                           model=ModelSettings(config_size="tiny", models=(1,)))
    settings.out.mkdir()
    seconds: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    parsed = read_targets(settings.input)
    timed("read_targets_s", started)
    with Ledger(settings.out) as ledger:
        started = time.perf_counter()
        ledger.register(parsed.targets, run_id=ledger.begin_run())
        timed("register_s", started)
        started = time.perf_counter()
        plan = _reconcile(ledger, parsed.targets, settings, None)
        timed("reconcile_s", started)
        started = time.perf_counter()
        ledger.register(parsed.targets, run_id=ledger.begin_run())
        timed("register_again_s", started)
    result = {"targets": len(parsed.targets), "to_search": len(plan.to_search), **seconds,
              "total_s": round(sum(seconds.values()), 2), "workdir": str(root)}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
