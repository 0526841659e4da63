"""Fit `parafold.fold.workmodel`'s coefficient table from traced matmul FLOPs.

For each config size (full, tiny) and family (templates: model_1_ptm, no templates:
model_3_ptm) this traces one iteration with `flops.iteration_flops` on a grid of shapes: the
MSA-depth buckets `shape_key` gives every model of the family, at a few length buckets, plus
small shapes on both sides of the outer product mean's few-rows switch. It fits the monomials
of `workmodel` by least squares, rounds them to integers when that stays exact, prints the table
as the Python literal to paste into `workmodel._TABLE`, and checks it on held-out shapes
(including big realistic buckets, far outside the grid's lengths).

    .venv/bin/python benchmarks/fit_work_model.py [--sizes full,tiny] [--workers 2]

A trace takes ~3 s (no templates) or ~7 s (templates) on a 2-core machine; the whole fit runs in
~6 minutes with 2 workers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np

from parafold.fold.buckets import ShapeKey, length_ladder, shape_key
from parafold.fold.config import NO_TEMPLATES, TEMPLATES, depth_caps
from parafold.fold.settings import ModelSettings
from parafold.fold.workmodel import (
    FEW_EXTRA_ROWS_TERMS,
    FEW_MSA_ROWS_TERMS,
    OPM_FEW_ROWS,
    TERMS,
    WorkPolynomial,
    work_polynomial,
)

Shape = tuple[int, int, int]  # (length, clusters, extra)


@dataclass(frozen=True)
class Case:
    config_size: str
    family: str
    traced_model: str
    family_models: tuple[str, ...]


CASES = (
    Case("full", TEMPLATES, "model_1_ptm", ("model_1_ptm", "model_2_ptm")),
    Case("full", NO_TEMPLATES, "model_3_ptm", ("model_3_ptm", "model_4_ptm", "model_5_ptm")),
    Case("tiny", TEMPLATES, "model_1_ptm", ("model_1_ptm", "model_2_ptm")),
    Case("tiny", NO_TEMPLATES, "model_3_ptm", ("model_3_ptm", "model_4_ptm", "model_5_ptm")),
)

# Small shapes on both sides of OPM_FEW_ROWS (16) for S + templates and for E, boundaries
# included: (L, S, E).
SMALL_SHAPES: tuple[Shape, ...] = (
    (16, 1, 1), (16, 9, 14), (24, 4, 6), (24, 12, 24), (40, 2, 16), (40, 20, 3),
    (16, 30, 20), (24, 7, 40), (32, 16, 17),
)
# Held out: small shapes in each regime, and bucket-sized ones (lengths not in the grid).
HELD_OUT_SMALL: tuple[Shape, ...] = ((20, 5, 11), (36, 14, 30), (28, 3, 50), (52, 40, 9))
HELD_OUT_LENGTHS = (88, 248)


def _settings(config_size: str) -> ModelSettings:
    return ModelSettings(config_size=config_size, msa_depth_buckets=True, compile_cache_dir=None)


def bucket_depths(case: Case) -> list[tuple[int, int]]:
    """Every (clusters, extra) bucket pair `shape_key` gives a model of the family."""
    settings = _settings(case.config_size)
    pairs = set()
    for model in case.family_models:
        caps = depth_caps(model, case.config_size)
        for depth in range(1, caps.clusters + caps.extra + 1):
            key = shape_key(64, depth, model, settings)
            pairs.add((key.clusters, key.extra))
    return sorted(pairs)


def grid(case: Case) -> list[Shape]:
    """Fit shapes: each bucket pair at two of three length buckets, plus SMALL_SHAPES."""
    ladder = length_ladder(_settings(case.config_size))
    lengths = (ladder[0], ladder[5], ladder[10])
    shapes = {(lengths[(i + j) % 3], s, e)
              for i, (s, e) in enumerate(bucket_depths(case)) for j in range(2)}
    return sorted(shapes | set(SMALL_SHAPES))


def held_out(case: Case) -> list[Shape]:
    pairs = bucket_depths(case)
    bucketed = [(HELD_OUT_LENGTHS[0], *pairs[1]), (HELD_OUT_LENGTHS[1], *pairs[-1])]
    shapes = [*HELD_OUT_SMALL, *bucketed]
    assert not set(shapes) & set(grid(case)), "held-out shapes must not be grid points"
    return shapes


def templates_of(case: Case) -> int:
    return depth_caps(case.traced_model, case.config_size).templates


def trace(config_size: str, model: str, family: str, templates: int, shape: Shape
          ) -> tuple[float, float]:
    """(matmul FLOPs of one iteration, seconds the trace took)."""
    from parafold.fold.flops import iteration_flops

    started = time.perf_counter()
    flops = iteration_flops(model, _settings(config_size),
                            ShapeKey(family, *shape, templates=templates))
    return flops, time.perf_counter() - started


def _columns(templates: int) -> list[WorkPolynomial]:
    """One unit polynomial per fitted coefficient, so gating matches the module exactly."""
    unit = [WorkPolynomial(templates, {m: 1}, {}, {}) for m in TERMS]
    unit += [WorkPolynomial(templates, {}, {m: 1}, {}) for m in FEW_MSA_ROWS_TERMS]
    unit += [WorkPolynomial(templates, {}, {}, {m: 1}) for m in FEW_EXTRA_ROWS_TERMS]
    return unit


def fit(templates: int, shapes: list[Shape], flops: list[float]
        ) -> tuple[WorkPolynomial, int, float]:
    """(polynomial, design rank, max relative residual on the fit points)."""
    columns = _columns(templates)
    design = np.array([[c.flops(*shape) for c in columns] for shape in shapes])
    target = np.asarray(flops)
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    solution, _, rank, _ = np.linalg.lstsq(design / scale, target, rcond=None)
    raw = solution / scale
    rounded = np.rint(raw)
    exact = np.max(np.abs(design @ rounded - target) / target) < 1e-12
    coefficients = [int(c) for c in rounded] if exact else [float(c) for c in raw]
    n_terms, n_msa = len(TERMS), len(FEW_MSA_ROWS_TERMS)
    polynomial = WorkPolynomial(
        templates,
        dict(zip(TERMS, coefficients[:n_terms], strict=True)),
        dict(zip(FEW_MSA_ROWS_TERMS, coefficients[n_terms:n_terms + n_msa], strict=True)),
        dict(zip(FEW_EXTRA_ROWS_TERMS, coefficients[n_terms + n_msa:], strict=True)))
    residual = max(abs(polynomial.flops(*s) - f) / f for s, f in zip(shapes, flops, strict=True))
    return polynomial, int(rank), residual


def _mapping_literal(name: str, coefficients: dict[str, int | float], indent: str) -> str:
    items = [f'"{m}": {c!r}' for m, c in coefficients.items()]
    lines, line = [], f"{indent}{name}={{"
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "},")
        if len(line) + len(piece) + 1 > 99 and not line.endswith("{"):
            lines.append(line)
            line = indent + " " * (len(name) + 2) + piece
        else:
            line += ("" if line.endswith("{") else " ") + piece
    return "\n".join([*lines, line])


def table_literal(polynomials: dict[tuple[str, str], WorkPolynomial]) -> str:
    out = ["_TABLE: dict[tuple[str, str], WorkPolynomial] = {"]
    for (config_size, family), p in polynomials.items():
        out.append(f'    ("{config_size}", "{family}"): WorkPolynomial(')
        out.append(f"        templates={p.templates},")
        out.append(_mapping_literal("terms", dict(p.terms), " " * 8))
        out.append(_mapping_literal("few_msa_rows", dict(p.few_msa_rows), " " * 8))
        out.append(_mapping_literal("few_extra_rows", dict(p.few_extra_rows), " " * 8))
        out.append("    ),")
    out.append("}")
    return "\n".join(out)


def _current_error(case: Case, shapes: list[Shape], flops: list[float]) -> float | None:
    """Max relative error of the module's current table, if it has this case."""
    try:
        current = work_polynomial(case.config_size, case.family)
    except ValueError:
        return None
    return max(abs(current.flops(*s) - f) / f for s, f in zip(shapes, flops, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="full,tiny", help="config sizes, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="tracing processes")
    args = parser.parse_args()

    from alphafold.model.modules import OPM_REASSOCIATE_ROWS

    if OPM_REASSOCIATE_ROWS != OPM_FEW_ROWS:
        raise SystemExit(f"alphafold's OPM_REASSOCIATE_ROWS is {OPM_REASSOCIATE_ROWS}, "
                         f"workmodel.OPM_FEW_ROWS {OPM_FEW_ROWS}: update the module first")
    sizes = args.sizes.split(",")
    cases = [c for c in CASES if c.config_size in sizes]
    jobs = [(case, shape, kind) for case in cases
            for kind, shapes in (("fit", grid(case)), ("held_out", held_out(case)))
            for shape in shapes]
    # templates traces are the slow ones: start them first so the workers finish together
    jobs.sort(key=lambda job: job[0].family != TEMPLATES)
    print(f"tracing {len(jobs)} shapes with {args.workers} workers", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(trace, case.config_size, case.traced_model, case.family,
                               templates_of(case), shape) for case, shape, _ in jobs]
        results = [f.result() for f in futures]
    print(f"traced in {time.perf_counter() - started:.0f} s\n")

    polynomials: dict[tuple[str, str], WorkPolynomial] = {}
    for case in cases:
        mine = [(shape, kind, result) for (c, shape, kind), result in zip(jobs, results,
                                                                            strict=True)
                if c == case]
        fit_shapes = [s for s, kind, _ in mine if kind == "fit"]
        fit_flops = [r[0] for _, kind, r in mine if kind == "fit"]
        test_shapes = [s for s, kind, _ in mine if kind == "held_out"]
        test_flops = [r[0] for _, kind, r in mine if kind == "held_out"]
        seconds = [r[1] for _, _, r in mine]
        polynomial, rank, residual = fit(templates_of(case), fit_shapes, fit_flops)
        polynomials[(case.config_size, case.family)] = polynomial
        held_error = max(abs(polynomial.flops(*s) - f) / f
                         for s, f in zip(test_shapes, test_flops, strict=True))
        current = _current_error(case, test_shapes + fit_shapes, test_flops + fit_flops)
        n_columns = len(TERMS) + len(FEW_MSA_ROWS_TERMS) + len(FEW_EXTRA_ROWS_TERMS)
        print(f"{case.config_size} {case.family} ({case.traced_model}): {len(fit_shapes)} fit "
              f"points, rank {rank}/{n_columns}, max fit residual {residual:.2e}; "
              f"{len(test_shapes)} held out, max relative error {held_error:.2e}; "
              f"trace median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s"
              + ("" if current is None else
                 f"; module's current table: max relative error {current:.2e}"))
        if rank < n_columns:
            raise SystemExit("the grid does not determine every coefficient: add shapes")
    print("\n# Generated by benchmarks/fit_work_model.py; do not edit by hand.")
    print(table_literal(polynomials))


if __name__ == "__main__":
    main()
