"""Synthetic template structures: a plausible backbone for a sequence, written as PDB mmCIF.

The chain is grown residue by residue from ideal bond lengths, angles and torsions (helices
joined by extended loops), so consecutive C-alpha atoms sit 3.8 A apart as AlphaFold's
template featurizer checks. The mmCIF carries every item `alphafold.data.mmcif_parsing`
reads: entity and sequence loops, chemical components, asym ids, method, resolution and a
release date.
"""

from __future__ import annotations

import datetime
import math

import numpy as np

__all__ = ["backbone", "mmcif_text", "THREE_LETTER"]

THREE_LETTER = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU",
    "G": "GLY", "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE",
    "P": "PRO", "S": "SER", "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL",
}
_CHEM_NAMES = {
    "ALA": "ALANINE", "ARG": "ARGININE", "ASN": "ASPARAGINE", "ASP": "'ASPARTIC ACID'",
    "CYS": "CYSTEINE", "GLN": "GLUTAMINE", "GLU": "'GLUTAMIC ACID'", "GLY": "GLYCINE",
    "HIS": "HISTIDINE", "ILE": "ISOLEUCINE", "LEU": "LEUCINE", "LYS": "LYSINE",
    "MET": "METHIONINE", "PHE": "PHENYLALANINE", "PRO": "PROLINE", "SER": "SERINE",
    "THR": "THREONINE", "TRP": "TRYPTOPHAN", "TYR": "TYROSINE", "VAL": "VALINE",
}
# Engh & Huber ideal geometry (A, degrees).
_N_CA, _CA_C, _C_N, _C_O = 1.458, 1.525, 1.329, 1.231
_ANG_N_CA_C, _ANG_CA_C_N, _ANG_C_N_CA, _ANG_CA_C_O = 111.2, 116.2, 121.7, 120.5


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """np.cross for two 3-vectors without its generic-axis overhead (hot loop)."""
    return np.array([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2],
                     u[0] * v[1] - u[1] * v[0]])


def _place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle_deg: float,
           torsion_deg: float) -> np.ndarray:
    """Atom d with |cd| = bond, angle bcd and torsion abcd given (natural extension reference frame)."""
    angle, torsion = math.radians(angle_deg), math.radians(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    n = _cross(b - a, bc)
    n /= np.linalg.norm(n)
    frame = np.stack([bc, _cross(n, bc), n], axis=1)
    local = np.array([-bond * math.cos(angle),
                      bond * math.sin(angle) * math.cos(torsion),
                      bond * math.sin(angle) * math.sin(torsion)])
    return c + frame @ local


def _torsions(rng: np.random.Generator, length: int) -> list[tuple[float, float]]:
    """(phi, psi) per residue: helices of 8-18 residues separated by 3-6 extended residues."""
    out: list[tuple[float, float]] = []
    helix = True
    while len(out) < length:
        if helix:
            n = int(rng.integers(8, 19))
            out += [(-57.0 + rng.normal(0, 4), -47.0 + rng.normal(0, 4)) for _ in range(n)]
        else:
            n = int(rng.integers(3, 7))
            out += [(-120.0 + rng.normal(0, 15), 130.0 + rng.normal(0, 15)) for _ in range(n)]
        helix = not helix
    return out[:length]


def backbone(rng: np.random.Generator, length: int) -> np.ndarray:
    """Coordinates (length, 5, 3) of N, CA, C, O, CB for each residue."""
    tors = _torsions(rng, length)
    n0 = np.zeros(3)
    ca0 = np.array([_N_CA, 0.0, 0.0])
    ang = math.radians(180.0 - _ANG_N_CA_C)
    c0 = ca0 + _CA_C * np.array([math.cos(ang), math.sin(ang), 0.0])
    atoms = [[n0, ca0, c0]]
    for i in range(1, length):
        n_prev, ca_prev, c_prev = atoms[-1]
        psi_prev, phi = tors[i - 1][1], tors[i][0]
        n = _place(n_prev, ca_prev, c_prev, _C_N, _ANG_CA_C_N, psi_prev)
        ca = _place(ca_prev, c_prev, n, _N_CA, _ANG_C_N_CA, 180.0)
        c = _place(c_prev, n, ca, _CA_C, _ANG_N_CA_C, phi)
        atoms.append([n, ca, c])
    coords = np.zeros((length, 5, 3))
    for i, (n, ca, c) in enumerate(atoms):
        psi = tors[i][1]
        o = _place(n, ca, c, _C_O, _ANG_CA_C_O, psi + 180.0)
        b, cc = ca - n, c - ca
        cb = -0.58273431 * _cross(b, cc) + 0.56802827 * b - 0.54067466 * cc + ca
        coords[i] = [n, ca, c, o, cb]
    return coords


def _loop(names: list[str], rows: list[str]) -> str:
    return "loop_\n" + "".join(f"{n}\n" for n in names) + "".join(rows) + "#\n"


def mmcif_text(pdb_id: str, chain: str, sequence: str, coords: np.ndarray,
               release: datetime.date, resolution: float = 2.0) -> str:
    """One-chain mmCIF entry for `sequence` with `coords` from `backbone`."""
    entry = pdb_id.upper()
    names3 = [THREE_LETTER[aa] for aa in sequence]
    lines = [
        f"data_{entry}\n#\n_entry.id {entry}\n#\n",
        f"_exptl.entry_id {entry}\n_exptl.method 'X-RAY DIFFRACTION'\n#\n",
        f"_refine.entry_id {entry}\n_refine.pdbx_refine_id 'X-RAY DIFFRACTION'\n"
        f"_refine.ls_d_res_high {resolution:.2f}\n#\n",
        _loop(["_pdbx_audit_revision_history.ordinal",
               "_pdbx_audit_revision_history.data_content_type",
               "_pdbx_audit_revision_history.major_revision",
               "_pdbx_audit_revision_history.minor_revision",
               "_pdbx_audit_revision_history.revision_date"],
              [f"1 'Structure model' 1 0 {release.isoformat()}\n"]),
        "_entity.id 1\n_entity.type polymer\n_entity.pdbx_description 'SYNTHETIC PROTEIN'\n#\n",
        "_entity_poly.entity_id 1\n_entity_poly.type 'polypeptide(L)'\n"
        f"_entity_poly.pdbx_seq_one_letter_code_can\n;{sequence}\n;\n"
        f"_entity_poly.pdbx_strand_id {chain}\n#\n",
        _loop(["_entity_poly_seq.entity_id", "_entity_poly_seq.num", "_entity_poly_seq.mon_id",
               "_entity_poly_seq.hetero"],
              [f"1 {i} {name} n\n" for i, name in enumerate(names3, start=1)]),
        _loop(["_chem_comp.id", "_chem_comp.type", "_chem_comp.name"],
              [f"{n} 'L-peptide linking' {_CHEM_NAMES[n]}\n" for n in sorted(set(names3))]),
        f"_struct_asym.id {chain}\n_struct_asym.pdbx_blank_PDB_chainid_flag N\n"
        f"_struct_asym.pdbx_modified N\n_struct_asym.entity_id 1\n#\n",
        _loop(["_pdbx_poly_seq_scheme.asym_id", "_pdbx_poly_seq_scheme.entity_id",
               "_pdbx_poly_seq_scheme.seq_id", "_pdbx_poly_seq_scheme.mon_id",
               "_pdbx_poly_seq_scheme.pdb_seq_num", "_pdbx_poly_seq_scheme.auth_seq_num",
               "_pdbx_poly_seq_scheme.pdb_mon_id", "_pdbx_poly_seq_scheme.auth_mon_id",
               "_pdbx_poly_seq_scheme.pdb_strand_id", "_pdbx_poly_seq_scheme.pdb_ins_code"],
              [f"{chain} 1 {i} {n} {i} {i} {n} {n} {chain} .\n"
               for i, n in enumerate(names3, start=1)]),
    ]
    atom_cols = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id",
                 "label_comp_id", "label_asym_id", "label_entity_id", "label_seq_id",
                 "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
                 "B_iso_or_equiv", "auth_seq_id", "auth_comp_id", "auth_asym_id",
                 "auth_atom_id", "pdbx_PDB_model_num"]
    rows = []
    serial = 0
    for i, name in enumerate(names3):
        for k, atom in enumerate(("N", "CA", "C", "O", "CB")):
            if atom == "CB" and name == "GLY":
                continue
            serial += 1
            x, y, z = coords[i, k]
            rows.append(f"ATOM {serial} {atom[0]} {atom} . {name} {chain} 1 {i + 1} ? "
                        f"{x:.3f} {y:.3f} {z:.3f} 1.00 30.00 {i + 1} {name} {chain} {atom} 1\n")
    lines.append(_loop([f"_atom_site.{c}" for c in atom_cols], rows))
    return "".join(lines)
