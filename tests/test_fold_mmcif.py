"""`parafold.fold.mmcif.to_mmcif` writes byte for byte what AlphaFold's `protein.to_mmcif` writes.

Every comparison is exact string equality, and every protein parafold can write is checked to
take the fast path (not the fallback to AlphaFold's writer, which would pass trivially).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from alphafold.common import protein
from alphafold.common import residue_constants as rc

from parafold.fold import mmcif

SPECIAL_PLDDT = (0.0, 9.999, 100.0, 12.345, 99.995, 0.005, 50.0)
# Coordinates whose text changes width when rounded (10.000, -0.000, 1000.000).
SPECIAL_XYZ = (-0.0, 0.0, -0.0004, 9.9996, -9.9996, 999.9996, -99.9995, 0.0005)


def _prediction_protein(n: int, rng: np.random.Generator, *, first: int = 0, gaps: bool = False,
                        random_mask: bool = False, dtype=np.float32) -> protein.Protein:
    """Made as parafold makes it (`outputs._protein`): pLDDT repeated as per-atom B-factors."""
    aatype = rng.integers(0, rc.restype_num + 1, n)  # 20 is X (UNK, no standard atoms)
    step = rng.integers(1, 4, n) if gaps else np.ones(n, np.int64)
    residue_index = first + np.cumsum(step) - step[0]
    if random_mask:
        mask = (rng.random((n, rc.atom_type_num)) < 0.3).astype(np.float32)
    else:
        mask = rc.STANDARD_ATOM_MASK[aatype].astype(np.float32)
        mask *= rng.random(mask.shape) > 0.05  # some atoms missing
    mask[rng.integers(0, n), 1] = 1.0  # at least one atom
    positions = (rng.normal(size=(n, rc.atom_type_num, 3)) * rng.choice([3, 30, 300])).astype(dtype)
    flat = positions.reshape(-1)
    flat[rng.integers(0, flat.size, 6 * len(SPECIAL_XYZ))] = np.repeat(SPECIAL_XYZ, 6)
    plddt = rng.uniform(0, 100, n)
    plddt[rng.integers(0, n, len(SPECIAL_PLDDT))] = SPECIAL_PLDDT
    b_factors = np.repeat(plddt[:, None], rc.atom_type_num, axis=-1)
    result = {"structure_module": {"final_atom_positions": positions, "final_atom_mask": mask}}
    feats = {"aatype": aatype, "residue_index": residue_index}
    return protein.from_prediction(feats, result, b_factors=b_factors,
                                   remove_leading_feature_dimension=False)


def _assert_same(prot: protein.Protein, file_id: str = "T1000", model_type: str = "Monomer",
                 *, fast: bool = True) -> str:
    expected = protein.to_mmcif(prot, file_id=file_id, model_type=model_type)
    ours = mmcif.to_mmcif(prot, file_id=file_id, model_type=model_type)
    assert (mmcif._fast_to_mmcif(prot, file_id, model_type) is not None) is fast
    if ours != expected:
        a, b = expected.splitlines(), ours.splitlines()
        line = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                    min(len(a), len(b)))
        pytest.fail(f"line {line + 1} differs:\n"
                    f"alphafold: {a[line] if line < len(a) else '<end>'!r}\n"
                    f"parafold:  {b[line] if line < len(b) else '<end>'!r}")
    return ours


@pytest.mark.parametrize("n", [1, 2, 17, 100, 301, 999])
def test_same_text_as_alphafold(n):
    rng = np.random.default_rng(n)
    _assert_same(_prediction_protein(n, rng))
    _assert_same(_prediction_protein(n, rng, first=int(rng.integers(-20, 40)), gaps=True,
                                     random_mask=True, dtype=np.float64))


def test_same_text_for_random_proteins():
    rng = np.random.default_rng(2024)
    for _ in range(8):
        n = int(rng.integers(1, 400))
        _assert_same(_prediction_protein(n, rng, first=int(rng.integers(-5, 5)),
                                         gaps=bool(rng.integers(2)),
                                         random_mask=bool(rng.integers(2))))


@pytest.mark.parametrize("file_id", ["T1000", "t1000_model", "a b", "x'y", "x' y", "x' y\" z",
                                     'q"uote', "_name", "with;semicolon", ";start", "#hash",
                                     "$dollar", "[b]", "a\nb",
                                     "tab\tid", "ünïcode", "ß", ""])
def test_file_ids(file_id):
    prot = _prediction_protein(5, np.random.default_rng(5))
    try:
        expected = protein.to_mmcif(prot, file_id=file_id, model_type="Monomer")
    except Exception as exc:  # AlphaFold's writer fails on "" (MMCIFIO indexes value[0])
        with pytest.raises(type(exc)):
            mmcif.to_mmcif(prot, file_id=file_id)
        return
    assert mmcif.to_mmcif(prot, file_id=file_id) == expected
    _assert_same(prot, file_id)


@pytest.mark.parametrize("file_id", ["data_1", "DATA_x", "save_y", "loop_", "Stop_it",
                                     "global_z", "data_it's"])
def test_an_id_read_as_a_reserved_word_is_quoted(file_id):
    """CIF's reserved words are case-insensitive; AlphaFold's writer (through Biopython)
    quotes `data_x` but upper-cases it first, so `_entry.id DATA_X` went out bare and strict
    readers (gemmi, the wwPDB's) refused the file. Only that line differs from AlphaFold's."""
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    prot = _prediction_protein(5, np.random.default_rng(5))
    expected = protein.to_mmcif(prot, file_id=file_id, model_type="Monomer").splitlines()
    ours = mmcif.to_mmcif(prot, file_id=file_id).splitlines()
    changed = [i for i, (a, b) in enumerate(zip(expected, ours, strict=True)) if a != b]
    fid = file_id.upper()
    line = next(i for i, text in enumerate(ours) if text.startswith("_entry.id"))
    assert ours[line].split(None, 1)[1] in (f"'{fid}'", f'"{fid}"')
    assert changed == ([] if "'" in fid else [line])  # Biopython quotes one with a quote
    if not fid.startswith("LOOP_"):  # Biopython's own reader takes a quoted 'loop_' as one
        assert MMCIF2Dict(io.StringIO("\n".join(ours)))["_entry.id"] == [fid]


def test_a_long_id_is_cut_to_a_legal_data_block_code():
    """A CIF data block code holds at most 75 characters (parafold's names reach 80)."""
    prot = _prediction_protein(5, np.random.default_rng(5))
    text = mmcif.to_mmcif(prot, file_id="n" * 80)
    assert text.splitlines()[0] == "data_" + "N" * 75
    assert "_entry.id   " + "N" * 75 in text.splitlines()


@pytest.mark.parametrize("model_type", ["Monomer", "Multimer", "monomer_ptm", "it's a model",
                                        "x' y\" z", ""])
def test_model_types(model_type):
    # AlphaFold only puts model_type into `_ma_model_list.model_group_name`; any text is taken
    _assert_same(_prediction_protein(9, np.random.default_rng(9)), "T1", model_type)


def test_one_row_tables_are_key_value_lines():
    """MMCIFIO writes a table with one row as `key value` lines, not as a loop."""
    prot = _prediction_protein(1, np.random.default_rng(1))
    one_atom = np.zeros_like(prot.atom_mask)
    one_atom[0, 1] = 1.0
    text = _assert_same(protein.Protein(**{**vars(prot), "atom_mask": one_atom}))
    assert "_atom_site.Cartn_x" in text and "loop_\n_atom_site" not in text
    assert "loop_\n_entity_poly_seq" not in text and "loop_\n_atom_type" not in text
    # one residue numbered 1 but several atoms: the sequence is one row, the atoms a loop
    _assert_same(protein.Protein(**{**vars(prot), "residue_index": np.array([1])}))


def test_odd_numbering_chain_and_b_factors():
    rng = np.random.default_rng(11)
    prot = _prediction_protein(40, rng, gaps=True)
    fields = vars(prot)
    shuffled = rng.permutation(fields["residue_index"])
    repeated = np.sort(rng.integers(-3, 30, 40))  # AlphaFold's own gap filling handles these
    for residue_index in (shuffled, repeated, fields["residue_index"] + 10_000):
        _assert_same(protein.Protein(**{**fields, "residue_index": residue_index}))
    # one chain with another index: chain D, entity 3
    _assert_same(protein.Protein(**{**fields, "chain_index": np.full(40, 3)}))
    # per-atom B-factors, -0.0 (written "-0.00") next to 0.0; float32 values
    b = rng.choice([0.0, -0.0, 12.345, 9.999, 100.0], size=fields["b_factors"].shape)
    _assert_same(protein.Protein(**{**fields, "b_factors": b}))
    _assert_same(protein.Protein(**{**fields, "b_factors": b.astype(np.float32) + 0.004}))
    # only CA atoms: one atom type symbol
    ca = np.zeros_like(fields["atom_mask"])
    ca[:, 1] = 1
    _assert_same(protein.Protein(**{**fields, "atom_mask": ca}))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # AlphaFold's mean pLDDT of no atom
def test_cases_left_to_alphafold():
    rng = np.random.default_rng(13)
    fields = vars(_prediction_protein(12, rng))
    two_chains = np.repeat([0, 1], 6)
    nan_xyz = fields["atom_positions"].copy()
    nan_xyz[tuple(np.argwhere(fields["atom_mask"] >= 0.5)[0])] = np.nan  # a written atom's
    for changes in ({"chain_index": two_chains}, {"atom_positions": nan_xyz},
                    {"atom_mask": np.zeros_like(fields["atom_mask"])}):  # no atom at all
        _assert_same(protein.Protein(**{**fields, **changes}), fast=False)
    bad = protein.Protein(**{**fields, "aatype": np.full(12, 21)})
    with pytest.raises(IndexError):
        protein.to_mmcif(bad, file_id="T1", model_type="Monomer")
    with pytest.raises(IndexError):
        mmcif.to_mmcif(bad, file_id="T1")


def test_biopython_reads_the_same_atoms():
    from Bio.PDB import MMCIFParser

    prot = _prediction_protein(60, np.random.default_rng(60), first=4, gaps=True)
    text = mmcif.to_mmcif(prot, file_id="T1000")
    structure = MMCIFParser(QUIET=True).get_structure("T1000", io.StringIO(text))
    atoms = list(structure.get_atoms())
    res, kind = np.nonzero(prot.atom_mask >= 0.5)
    assert len(atoms) == len(res)
    assert [a.get_parent().id[1] for a in atoms] == prot.residue_index[res].tolist()
    assert [a.get_parent().get_resname() for a in atoms] == [
        rc.resnames[i] for i in prot.aatype[res]]
    assert [a.get_name() for a in atoms] == [rc.atom_types[k] for k in kind]
    np.testing.assert_allclose([a.coord for a in atoms], prot.atom_positions[res, kind],
                               atol=5e-4 + 1e-6)
    np.testing.assert_allclose([a.bfactor for a in atoms], prot.b_factors[res, kind],
                               atol=5e-3 + 1e-6)


def test_write_target_outputs_writes_alphafold_text(tmp_path):
    from parafold.fold.outputs import Prediction, _protein, write_target_outputs

    rng = np.random.default_rng(3)
    n = 30
    aatype = rng.integers(0, 20, n)
    result = {"plddt": rng.uniform(20, 95, n), "structure_module": {
        "final_atom_positions": rng.normal(size=(n, 37, 3)).astype(np.float32) * 10,
        "final_atom_mask": rc.STANDARD_ATOM_MASK[aatype].astype(np.float32)}}
    pred = Prediction(name="model_1", model_name="model_1", seed=0, result=result,
                      aatype=aatype, residue_index=np.arange(n), timings={})
    write_target_outputs(tmp_path, "target_a", [pred], {"predict": 1.0}, save_raw=False)
    expected = protein.to_mmcif(_protein(pred), file_id="target_a", model_type="Monomer")
    assert (tmp_path / "ranked_0.cif").read_text() == expected
