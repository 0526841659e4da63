"""`parafold demo`: synthetic databases, random weights, the whole pipeline, in minutes.

Everything lives under OUT: `OUT/databases` (built once, reused when complete), `OUT/params`
(random weights of the real architecture: the full config on a GPU, the tiny one on a CPU),
and the run's own outputs and ledger. A rerun resumes like any `parafold run`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from parafold.engine.base import detect_gpus, parse_gpus
from parafold.pipeline import RunSettings

__all__ = ["prepare_demo", "DEMO_MODELS", "DEMO_RECYCLES"]

logger = logging.getLogger(__name__)

DEMO_MODELS = (1,)
DEMO_RECYCLES = {"full": 3, "tiny": 1}
# On a CPU the model's cost grows with the cube of the length: the demo folds the first
# CPU_DEMO_LENGTH residues of each query (all in one length bucket, so one compile).
CPU_DEMO_LENGTH = 64


def _ensure_params(params_dir: Path, model: object) -> None:
    """Random weights for the demo's models, unless a matching set is already there."""
    from parafold.fold.params import read_params_info, write_random_params
    from parafold.fold.settings import ModelSettings

    assert isinstance(model, ModelSettings)
    info = read_params_info(params_dir) or {}
    if info.get("config") == model.config_size and \
            set(model.model_names) <= set(info.get("models", [])):
        return
    logger.info("writing random %s weights to %s", model.config_size, params_dir)
    write_random_params(params_dir, model)


def _demo_queries(queries: Path, dest: Path, length: int | None) -> Path:
    """The demo's FASTA: the synthetic queries (cut to `length` residues on a CPU), and the
    first one again under a second id, as proteomes repeat proteins: it is searched and
    predicted once, and its files are copied (`fold.twins`)."""
    from parafold.inputs import read_targets
    from parafold.store import atomic_write_text

    records = [(t.id, t.sequence[:length] if length else t.sequence)
               for t in read_targets(queries).targets]
    first_id, first_sequence = records[0]
    records.append((f"{first_id}_again the same protein under a second id", first_sequence))
    atomic_write_text(dest, "".join(f">{rid}\n{seq}\n" for rid, seq in records))
    return dest


def prepare_demo(out: Path, *, families: int = 24, cpus: int = 0, gpus: str = "all",
                 plots: bool = True) -> tuple[RunSettings, str]:
    """Build (or reuse) the demo's databases and weights; the run settings and a note on them.

    Raises:
        ToolNotFoundError: the HH-suite or MMseqs2 programs are missing.
        InputError: OUT/databases holds something that is not a synthetic database set.
    """
    from parafold.fold.settings import ModelSettings
    from parafold.search.settings import SearchSettings
    from parafold.testdata import build_testdata

    out = Path(out)
    wanted = parse_gpus(gpus)
    devices = detect_gpus() if wanted is None else wanted
    config = "full" if devices else "tiny"
    data = build_testdata(out / "databases", families=families, mmseqs=False)
    model = ModelSettings(config_size=config, models=DEMO_MODELS,
                          num_recycle=DEMO_RECYCLES[config],
                          max_length_waste=0.15 if devices else 0.5)
    queries = _demo_queries(data.queries, out / "demo_queries.fasta",
                            None if devices else CPU_DEMO_LENGTH)
    params_dir = out / "params"
    _ensure_params(params_dir, model)
    where = (f"GPU(s) {','.join(devices)}: the full AlphaFold2 architecture" if devices
             else f"no GPU: the tiny model config on the CPU, the first {CPU_DEMO_LENGTH} "
                  "residues of each protein")
    note = (f"demo: {families} synthetic proteins and one of them again under a second id, "
            f"databases in {out / 'databases'}, random "
            f"weights in {params_dir} ({where}, model {DEMO_MODELS[0]}, "
            f"{model.num_recycle} recycling iteration(s))")
    settings = RunSettings(
        input=queries, out=out, params_dir=params_dir, db_dir=out / "databases",
        search=SearchSettings(), model=model, cpus=cpus, gpus=devices,
        max_wait_s=2.0, plots=plots)
    return settings, note
