"""CPU cost of writing one target's output files, and of its mmCIF writer alone.

    .venv/bin/python benchmarks/write_outputs.py
    .venv/bin/python benchmarks/write_outputs.py --lengths 60,100,150,300 --repeats 20

For each length, one synthetic monomer_ptm prediction (random coordinates, AlphaFold's standard
atoms for a random sequence, pLDDT, PAE): milliseconds per target (median of the repeats) for
`write_target_outputs` with parafold's mmCIF writer and with AlphaFold's, and for the two
writers alone (`parafold.fold.mmcif.to_mmcif`, `alphafold.common.protein.to_mmcif`), with the
speedups, and for giving a twin (a target with the same features) a copy of the files
(`parafold.fold.twins.copy_prediction`, what it costs instead of a prediction). Each writer's
text is checked to be identical before timing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from alphafold.common import protein
from alphafold.common import residue_constants as rc

from parafold.fold import mmcif
from parafold.fold.outputs import Prediction, _protein, write_target_outputs
from parafold.fold.twins import copy_prediction


def synthetic_prediction(length: int, seed: int = 0) -> Prediction:
    rng = np.random.default_rng(seed)
    aatype = rng.integers(0, 20, length)
    result = {
        "plddt": rng.uniform(30, 95, length),
        "ptm": np.float32(0.7),
        "predicted_aligned_error": rng.uniform(0, 31.75, (length, length)).astype(np.float32),
        "max_predicted_aligned_error": np.float32(31.75),
        "num_recycles": 3,
        "structure_module": {
            "final_atom_positions": (rng.normal(size=(length, 37, 3)) * 15).astype(np.float32),
            "final_atom_mask": rc.STANDARD_ATOM_MASK[aatype].astype(np.float32),
        },
    }
    return Prediction(name="model_1_ptm_pred_0", model_name="model_1_ptm", seed=0,
                      result=result, aatype=aatype, residue_index=np.arange(length),
                      timings={"predict_model_1_ptm_pred_0": 1.0})


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: imports, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="60,100,150,300")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    fast_writer = mmcif.to_mmcif

    def alphafold_writer(prot, *, file_id, model_type="Monomer"):
        return protein.to_mmcif(prot, file_id=file_id, model_type=model_type)

    print(f"{'length':>6} {'atoms':>6} | {'outputs, AF cif':>15} {'outputs, ours':>13} "
          f"{'speedup':>7} | {'AF to_mmcif':>11} {'ours':>6} {'speedup':>7} | "
          f"{'copy to twin':>12}   (ms per target)")
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            pred = synthetic_prediction(length)
            prot = _protein(pred)
            assert fast_writer(prot, file_id="T1000") == alphafold_writer(prot, file_id="T1000")
            folder = Path(tmp) / f"t{length}"

            def write_outputs(pred=pred, folder=folder):
                write_target_outputs(folder, "T1000", [pred], {"features": 1.0}, save_raw=False)

            try:
                mmcif.to_mmcif = alphafold_writer  # what outputs.py called before
                outputs_af = median_ms(write_outputs, args.repeats)
            finally:
                mmcif.to_mmcif = fast_writer
            outputs_ours = median_ms(write_outputs, args.repeats)
            cif_af = median_ms(lambda prot=prot: alphafold_writer(prot, file_id="T1000"),
                               args.repeats)
            cif_ours = median_ms(lambda prot=prot: fast_writer(prot, file_id="T1000"),
                                 args.repeats)
            copy = median_ms(lambda folder=folder: copy_prediction(
                folder, folder.with_name(folder.name + "_twin"), "T1001"), args.repeats)
            atoms = int((prot.atom_mask >= 0.5).sum())
            print(f"{length:>6} {atoms:>6} | {outputs_af:>15.1f} {outputs_ours:>13.1f} "
                  f"{outputs_af / outputs_ours:>6.1f}x | {cif_af:>11.1f} {cif_ours:>6.2f} "
                  f"{cif_af / cif_ours:>6.1f}x | {copy:>12.1f}")


if __name__ == "__main__":
    main()
