"""`ranked_N.cif` without AlphaFold's per-value mmCIF formatting: same bytes, far less CPU.

`alphafold.common.protein.to_mmcif` puts every atom's 18 values into a dict one by one and has
Biopython's `MMCIFIO` quote-check and pad each of them: most of the CPU it takes to write one
target's files. This builds the same text directly: the atom and sequence tables from numpy
arrays with one `%` template per row (their values never need quoting), the metadata and chain
tables once per chain and model type, through the same quoting rules (`MMCIFIO`'s own methods)
and AlphaFold's own constants and metadata (`residue_constants`, `mmcif_metadata`).

The output must stay byte-identical to AlphaFold's writer; `tests/test_fold_mmcif.py` guards
that. Proteins this does not reproduce itself go to AlphaFold's writer (same text, or the same
exception): more than one chain, no atom at all, a non-finite coordinate or B-factor, a residue
type outside 0-20, or arrays of unexpected shape or dtype. Parafold's monomer predictions never
need it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from alphafold.common import mmcif_metadata, protein
from alphafold.common import residue_constants as rc
from Bio.PDB.mmcifio import MMCIFIO

__all__ = ["renamed", "to_mmcif"]

_IO = MMCIFIO()  # only its quoting rules are used
_RESNAMES = np.array(rc.resnames, dtype=object)  # index 20 is UNK
_ATOM_NAMES = list(rc.atom_types)
_ATOM_SYMBOLS = [rc.atom_id_to_type(name) for name in rc.atom_types]
_FLOATS = (np.float16, np.float32, np.float64)
# Categories of AlphaFold's metadata whose values come from the atoms.
_FROM_ATOMS = {"_ma_qa_metric_global.metric_value", "_atom_type.symbol"}

Columns = Sequence[tuple[str, Sequence[str]]]


def to_mmcif(prot: Any, *, file_id: str, model_type: str = "Monomer") -> str:
    """`alphafold.common.protein.to_mmcif(prot, file_id, model_type)`, byte for byte, for
    an id CIF holds as it is. AlphaFold's writer names the file `str(index)`; parafold names
    it after the target, so two cases AlphaFold never meets are made legal here: an id is cut
    to 75 characters (CIF's longest data block code), and an `_entry.id` that reads as a
    reserved word (`DATA_1`: CIF's are case-insensitive, Biopython quotes only lowercase
    ones) is quoted, or gemmi and the wwPDB's reader refuse the file."""
    file_id = file_id[:MAX_BLOCK_CODE]
    text = _fast_to_mmcif(prot, file_id, model_type)
    if text is None:
        text = protein.to_mmcif(prot, file_id=file_id, model_type=model_type)
    return _quote_reserved_entry_id(text, file_id.upper())


def renamed(text: str, file_id: str) -> str | None:
    """An mmCIF `to_mmcif` wrote, as it writes it for `file_id`: only the data block line
    and `_entry.id` name the file. None for text that does not start as `to_mmcif` writes.

    A copied prediction is renamed this way rather than rebuilt from its PDB, which holds no
    residue without atoms (an X, U, B, Z or O): rebuilt, trailing ones were lost."""
    head = text.split("\n", 4)
    if (len(head) < 5 or not head[0].startswith("data_") or head[1] != "#"
            or not head[2].startswith("_entry.id ") or head[3] != "#"):
        return None
    fid = file_id[:MAX_BLOCK_CODE].upper()
    return _quote_reserved_entry_id(_header(fid), fid) + head[4]


def _header(fid: str) -> str:
    """The data block line and `_entry`: all of the file that names it."""
    return f"data_{fid}\n#\n" + _category("_entry", [("id", [fid])])


MAX_BLOCK_CODE = 75
_RESERVED_PREFIXES = ("data_", "save_", "loop_", "stop_", "global_")


def _quote_reserved_entry_id(text: str, fid: str) -> str:
    """`text` with its `_entry.id` value quoted when it starts like a CIF reserved word."""
    if not fid.lower().startswith(_RESERVED_PREFIXES):
        return text
    quote = "'" if "'" not in fid else '"'
    line = re.compile(rf"^(_entry\.id\s+){re.escape(fid)}$", re.MULTILINE)
    return line.sub(lambda m: f"{m.group(1)}{quote}{fid}{quote}", text, count=1)


def _fast_to_mmcif(prot: Any, file_id: str, model_type: str) -> str | None:
    """The mmCIF text, or None for a protein left to AlphaFold's writer."""
    aatype = np.asarray(prot.aatype)
    positions = np.asarray(prot.atom_positions)
    atom_mask = np.asarray(prot.atom_mask)
    b_factors = np.asarray(prot.b_factors)
    residue_index = np.asarray(prot.residue_index)
    chain_index = np.asarray(prot.chain_index)
    n = len(aatype) if aatype.ndim == 1 else 0
    if (n == 0 or aatype.dtype.kind not in "iu" or positions.shape != (n, rc.atom_type_num, 3)
            or atom_mask.shape != (n, rc.atom_type_num) or b_factors.shape != atom_mask.shape
            or residue_index.shape != (n,) or chain_index.shape != (n,)
            or positions.dtype.type not in _FLOATS or b_factors.dtype.type not in _FLOATS
            or residue_index.dtype.kind not in "iuf" or chain_index.dtype.kind not in "iuf"
            or aatype.min() < 0 or aatype.max() > rc.restype_num):
        return None
    chains = np.unique(chain_index.astype(np.int32))
    if len(chains) != 1 or chains[0] < 0:
        return None
    keep = ~(atom_mask < 0.5)  # AlphaFold skips `mask < 0.5`, so a NaN mask keeps its atom
    res, kind = np.nonzero(keep)  # row-major: AlphaFold's order of atoms
    xyz = positions[res, kind].astype(np.float64)
    bfac = b_factors[res, kind].astype(np.float64)
    if len(res) == 0 or not (np.isfinite(xyz).all() and np.isfinite(bfac).all()):
        return None

    chain = protein._int_id_to_str_id(int(chains[0]) + 1)
    entity = str(chains[0])
    residue_index = residue_index.astype(np.int32)
    fid = file_id.upper()
    atoms, metric, symbols = _atom_site(aatype, residue_index, res, kind, xyz, bfac,
                                        chain, entity)
    live = {"_ma_qa_metric_global.metric_value": [metric], "_atom_type.symbol": symbols}
    metadata = "".join(text or _category(name, [(item, live.get(f"{name}.{item}", values))
                                                for item, values in columns])
                       for name, columns, text in _metadata(chain, entity, model_type))
    return "".join((
        _header(fid),
        _chain_tables(chain, entity),
        _entity_poly_seq(aatype, residue_index, chain_index, entity),
        _chem_comp(),
        atoms,
        metadata,
    ))


def _category(name: str, columns: Columns, *, plain: bool = False) -> str:
    """One category as `MMCIFIO._save_dict` writes it: key-value lines for one row, else a
    loop with every column padded to its widest value plus one. `plain`: no value of a loop
    needs quoting (numbers, residue and atom names), so none is checked."""
    rows = len(columns[0][1])
    if rows == 1:
        width = len(name) + max(len(item) for item, _ in columns) + 4
        return "".join(f"{name}.{item}".ljust(width)
                       + _IO._format_mmcif_col(values[0], len(values[0])) + "\n"
                       for item, values in columns) + "#\n"
    head = "loop_\n" + "".join(f"{name}.{item}\n" for item, _ in columns)
    if plain:
        widths = [max(map(len, values), default=0) for _, values in columns]
        template = "".join(f"%-{w + 1}s" for w in widths) + "\n"
        table = zip(*(values for _, values in columns), strict=True)
        body = "".join(map(template.__mod__, table))
    else:
        widths = [max(map(_loop_width, values), default=0) for _, values in columns]
        body = "".join("".join(_IO._format_mmcif_col(value, w + 1)
                               for value, w in zip(row, widths, strict=True)) + "\n"
                       for row in zip(*(values for _, values in columns), strict=True))
    return head + body + "#\n"


def _loop_width(value: str) -> int:
    """A value's width in a loop column as MMCIFIO counts it: quotes add two characters (but
    a value written as a semicolon text field counts its bare length)."""
    if _IO._requires_quote(value) and not _IO._requires_newline(value):
        return len(value) + 2
    return len(value)


def _group(cif: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[str, Sequence[str]]]]:
    """`{"_cat.item": values}` to `{"_cat": [(item, values), ...]}`, keeping the order."""
    out: dict[str, list[tuple[str, Sequence[str]]]] = {}
    for key, values in cif.items():
        name, item = key.split(".")
        out.setdefault(name, []).append((item, values))
    return out


@functools.lru_cache(maxsize=64)
def _chain_tables(chain: str, entity: str) -> str:
    """`_struct_asym`, `_entity_poly` and `_entity` of a one-chain protein."""
    return "".join((
        _category("_struct_asym", [("id", [chain]), ("entity_id", [entity])]),
        _category("_entity_poly", [("entity_id", [entity]), ("type", [rc.PROTEIN_CHAIN]),
                                   ("pdbx_strand_id", [chain])]),
        _category("_entity", [("id", [entity]), ("type", [rc.POLYMER_CHAIN])]),
    ))


@functools.lru_cache(maxsize=1)
def _chem_comp() -> str:
    rows = [(chem_id, chem_type, chem_name)
            for chem_type, chem_comp in protein._CHEM_COMP.items()
            for chem_id, chem_name in chem_comp]
    ids, types, names = zip(*rows, strict=True)
    return _category("_chem_comp", [("id", ids), ("type", types), ("name", names)])


@functools.lru_cache(maxsize=64)
def _metadata(chain: str, entity: str, model_type: str
              ) -> tuple[tuple[str, Columns, str], ...]:
    """AlphaFold's metadata categories: (name, columns, text), the text empty for those that
    hold values from the atoms (formatted per protein)."""
    stub = {"_struct_asym.id": [chain], "_struct_asym.entity_id": [entity],
            "_atom_site.B_iso_or_equiv": ["0"], "_atom_site.type_symbol": ["C"]}
    groups = _group(mmcif_metadata.add_metadata_to_mmcif(stub, model_type))
    return tuple((name, tuple(columns),
                  "" if any(f"{name}.{item}" in _FROM_ATOMS for item, _ in columns)
                  else _category(name, columns))
                 for name, columns in groups.items())


def _entity_poly_seq(aatype: np.ndarray, residue_index: np.ndarray, chain_index: np.ndarray,
                     entity: str) -> str:
    """Every residue from min(1, first) to the last, gaps filled with UNK."""
    if len(residue_index) == 1 or (np.diff(residue_index.astype(np.int64)) > 0).all():
        start, end = min(1, int(residue_index[0])), int(residue_index[-1])
        aas = np.full(end - start + 1, rc.restype_num)
        aas[residue_index - start] = aatype
        nums: Sequence[int] = range(start, end + 1)
    else:  # unsorted or repeated numbers: AlphaFold's own (odd) filling
        ((nums, aas),) = protein._get_entity_poly_seq(
            aatype, residue_index, chain_index.astype(np.int32)).values()
        aas = np.asarray(aas)
    return _category("_entity_poly_seq", [("entity_id", [entity] * len(nums)),
                                          ("num", list(map(str, nums))),
                                          ("mon_id", _RESNAMES[aas].tolist())], plain=True)


def _float_width(values: np.ndarray, spec: str) -> int:
    """Width of the widest `format(value, spec)`: on each side of zero the text grows with
    |value|, so the largest positive and the most negative value decide it (-0.0 prints its
    sign)."""
    negative = np.signbit(values)
    extremes = []
    if negative.any():
        extremes.append(values[negative].min())
    if not negative.all():
        extremes.append(values[~negative].max())
    return max(len(format(float(v), spec)) for v in extremes)


def _atom_site(aatype: np.ndarray, residue_index: np.ndarray, res: np.ndarray,
               kind: np.ndarray, xyz: np.ndarray, bfac: np.ndarray, chain: str, entity: str
               ) -> tuple[str, str, list[str]]:
    """The `_atom_site` table, the global pLDDT as AlphaFold computes it (the mean of the
    B-factors as written) and the sorted atom symbols."""
    # Each distinct B-factor formatted once; -0.0 stays apart from 0.0 (it prints "-0.00").
    bits, b_of_atom = np.unique(np.ascontiguousarray(bfac).view(np.uint64), return_inverse=True)
    b_text = [f"{v:.2f}" for v in bits.view(np.float64).tolist()]
    metric = f"{np.mean(np.array([float(t) for t in b_text])[b_of_atom.ravel()]):.2f}"
    present_kinds = np.unique(kind).tolist()
    symbols = sorted({_ATOM_SYMBOLS[k] for k in present_kinds})

    seq = [str(i) for i in residue_index.tolist()]
    resnames = _RESNAMES[aatype].tolist()
    if len(res) == 1:  # MMCIFIO writes a one-row table as key-value lines
        r, k = int(res[0]), int(kind[0])
        x, y, z = (f"{v:.3f}" for v in xyz[0].tolist())
        values = ["ATOM", "1", _ATOM_SYMBOLS[k], _ATOM_NAMES[k], ".", resnames[r], chain,
                  entity, seq[r], ".", x, y, z, "1.00", b_text[0], seq[r], chain, "1"]
        return (_category("_atom_site", [(item, [v]) for item, v in
                                         zip(_ATOM_SITE_ITEMS, values, strict=True)]),
                metric, symbols)

    present_res = np.unique(res).tolist()
    w_sym = max(len(_ATOM_SYMBOLS[k]) for k in present_kinds) + 1
    w_name = max(len(_ATOM_NAMES[k]) for k in present_kinds) + 1
    w_res = max(len(resnames[r]) for r in present_res) + 1
    w_seq = max(len(seq[r]) for r in present_res) + 1
    w_b = max(len(t) for t in b_text) + 1
    # Constant columns (ATOM . chain entity . 1.00 chain 1) are their value plus one space.
    by_kind = np.array([f"{s:<{w_sym}}{a:<{w_name}}. " for s, a in
                        zip(_ATOM_SYMBOLS, _ATOM_NAMES, strict=True)], dtype=object)
    by_res = np.array([f"{name:<{w_res}}{chain} {entity} {num:<{w_seq}}. " for name, num in
                       zip(resnames, seq, strict=True)], dtype=object)
    tail = np.array([f"{num:<{w_seq}}{chain} 1 " for num in seq], dtype=object)
    b_cells = np.array([f"{t:<{w_b}}" for t in b_text], dtype=object)
    wx, wy, wz = (_float_width(xyz[:, i], ".3f") + 1 for i in range(3))
    row = (f"ATOM %-{len(str(len(res))) + 1}d%s%s"
           f"%-{wx}.3f%-{wy}.3f%-{wz}.3f1.00 %s%s\n")
    body = "".join(map(row.__mod__, zip(
        range(1, len(res) + 1), by_kind[kind].tolist(), by_res[res].tolist(),
        xyz[:, 0].tolist(), xyz[:, 1].tolist(), xyz[:, 2].tolist(),
        b_cells[b_of_atom.ravel()].tolist(), tail[res].tolist(), strict=True)))
    head = "loop_\n" + "".join(f"_atom_site.{item}\n" for item in _ATOM_SITE_ITEMS)
    return head + body + "#\n", metric, symbols


# AlphaFold's order, which is also MMCIFIO's `mmcif_order` for these items.
_ATOM_SITE_ITEMS = ("group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id",
                    "label_comp_id", "label_asym_id", "label_entity_id", "label_seq_id",
                    "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
                    "B_iso_or_equiv", "auth_seq_id", "auth_asym_id", "pdbx_PDB_model_num")
