"""The traced-free work model (`workmodel.shape_flops`) against `flops.iteration_flops` traces.

Shapes here are held out: none is a point of `benchmarks/fit_work_model.py`'s grid; together
they put every coefficient to work (both sides of the outer product mean's few-rows switch).
The merge planner needs 1%, but the table is exact (integer coefficients), so we check it to
1e-6: at 1%, these few small shapes would miss even a doubled L^3 or L*S^2 coefficient, which
would matter at large L or deep MSAs. A failure here means: rerun the fit script, paste its
table. A trace takes ~3 s (no templates) or ~7 s (templates) on a 2-core CPU.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from parafold.fold.buckets import ShapeKey
from parafold.fold.config import NO_TEMPLATES, TEMPLATES
from parafold.fold.workmodel import OPM_FEW_ROWS, shape_flops

EXACT = 1e-6  # float rounding only; the planner itself needs 1%
TRACED_MODEL = {TEMPLATES: "model_1_ptm", NO_TEMPLATES: "model_3_ptm"}
TEMPLATE_COUNT = {TEMPLATES: 4, NO_TEMPLATES: 0}  # full and tiny alike


def _key(family: str, length: int, clusters: int, extra: int) -> ShapeKey:
    return ShapeKey(family, length, clusters, extra, TEMPLATE_COUNT[family])


def _traced(config_size: str, key: ShapeKey) -> float:
    from parafold.fold.flops import iteration_flops
    from parafold.fold.settings import ModelSettings

    settings = ModelSettings(config_size=config_size, compile_cache_dir=None)
    return iteration_flops(TRACED_MODEL[key.family], settings, key)


@pytest.mark.parametrize(("config_size", "key"), [
    # few Evoformer rows (3 + 4 templates <= 16), many extra rows
    ("tiny", _key(TEMPLATES, 48, 3, 64)),
    # many Evoformer rows, few extra rows (16)
    ("tiny", _key(TEMPLATES, 56, 28, 16)),
    ("tiny", _key(NO_TEMPLATES, 48, 10, 64)),
    ("tiny", _key(NO_TEMPLATES, 56, 32, 16)),
    # model_2's shallowest full-config bucket: its extra MSA has 16 rows
    ("full", _key(TEMPLATES, 72, 31, 16)),
    ("full", _key(NO_TEMPLATES, 104, 128, 320)),
    # few Evoformer and extra rows in the full config (no bucket has few Evoformer rows)
    ("full", _key(NO_TEMPLATES, 40, 9, 12)),
], ids=lambda v: v if isinstance(v, str) else f"{v.family}-L{v.length}-S{v.clusters}-E{v.extra}")
def test_shape_flops_matches_the_traced_count(config_size: str, key: ShapeKey):
    assert shape_flops(key, config_size) == pytest.approx(_traced(config_size, key),
                                                          rel=EXACT)


def test_few_rows_switch_is_alphafolds():
    from alphafold.model.modules import OPM_REASSOCIATE_ROWS

    assert OPM_FEW_ROWS == OPM_REASSOCIATE_ROWS


def test_work_is_per_protein_and_grows_with_every_size():
    key = _key(NO_TEMPLATES, 120, 128, 1280)
    one = shape_flops(key, "full")
    assert shape_flops(replace(key, batch=8), "full") == one
    for bigger in (replace(key, length=136), replace(key, clusters=512),
                   replace(key, extra=5120)):
        assert shape_flops(bigger, "full") > one
    assert shape_flops(_key(TEMPLATES, 120, 127, 1280), "full") > 0


@pytest.mark.parametrize(("key", "config_size"), [
    (replace(_key(TEMPLATES, 64, 31, 80), templates=1), "full"),
    (replace(_key(NO_TEMPLATES, 64, 32, 80), templates=4), "tiny"),
    (_key(NO_TEMPLATES, 64, 32, 80), "huge"),
    (replace(_key(NO_TEMPLATES, 64, 32, 80), family="multimer"), "full"),
])
def test_unknown_config_or_template_count_is_refused(key: ShapeKey, config_size: str):
    with pytest.raises(ValueError):
        shape_flops(key, config_size)


def test_module_imports_no_jax():
    code = ("import sys, parafold.fold.workmodel; "
            "sys.exit(any(m.split('.')[0] in ('jax', 'numpy') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
