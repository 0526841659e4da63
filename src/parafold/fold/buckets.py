"""Which padded shape each target runs at: length buckets and MSA-depth buckets.

Pure Python so the scheduler can group targets before any accelerator starts. A length bucket
wastes at most `max_length_waste` of its residues on padding for any target of at least
`min_length_bucket` residues; the ladder grows geometrically, so 50-300 residues need about a
dozen shapes. MSA depth buckets are a coarse ladder (factor 4 up to the config's size) so a
shallow MSA is not padded to 512 clusters and 5,120 extra rows; padded rows are masked.
A small group may run in a bigger shape that runs anyway (`merge_small_groups`): up to
`ModelSettings.merge_max_waste` padding, for at most `merge_max_members` targets, because a
compile costs a GPU far more than their padding does.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from parafold.fold.config import DepthCaps, depth_caps, family_of
from parafold.fold.settings import ModelSettings

__all__ = ["ShapeKey", "length_ladder", "length_bucket", "depth_ladder", "depth_bucket",
           "shape_key", "padding_waste", "holds", "merge_small_groups"]

_DEPTH_FACTOR = 4


@dataclass(frozen=True, slots=True, order=True)
class ShapeKey:
    """Everything that decides a compiled function's input shapes.

    Models of one family share the key and so the compiled function; `batch` is 1 until
    several proteins go through one forward pass.
    """

    family: str
    length: int
    clusters: int
    extra: int
    templates: int
    batch: int = 1
    low_memory: bool = False

    def describe(self) -> str:
        return (f"{self.family} L={self.length} clusters={self.clusters} extra={self.extra} "
                f"templates={self.templates} batch={self.batch}"
                + (" low-memory" if self.low_memory else ""))


@functools.lru_cache(maxsize=32)
def _ladder(min_bucket: int, multiple: int, waste: float, limit: int) -> tuple[int, ...]:
    rungs = [min_bucket]
    while rungs[-1] < limit:
        prev = rungs[-1]
        # The largest bucket that keeps (bucket - length) / bucket <= waste for length = prev + 1.
        top = int((prev + 1) / (1.0 - waste))
        rounded = top - top % multiple
        rungs.append(rounded if rounded > prev else max(top, prev + 1))
    return tuple(rungs)


def length_ladder(settings: ModelSettings, limit: int = 4096) -> tuple[int, ...]:
    """The padded lengths targets may be put in, up to the first one >= limit."""
    return _ladder(settings.min_length_bucket, settings.length_multiple,
                   settings.max_length_waste, limit)


def length_bucket(length: int, settings: ModelSettings) -> int:
    """The smallest bucket that holds `length` residues."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    ladder = length_ladder(settings, limit=max(length, 4096))
    return next(b for b in ladder if b >= length)


def padding_waste(length: int, bucket: int) -> float:
    return (bucket - length) / bucket


def depth_ladder(cap: int, minimum: int) -> tuple[int, ...]:
    """cap, cap/4, cap/16, ... down to `minimum` (or just above it), ascending."""
    rungs = [cap]
    while rungs[-1] // _DEPTH_FACTOR >= minimum:
        rungs.append(rungs[-1] // _DEPTH_FACTOR)
    return tuple(sorted(rungs))


def depth_bucket(rows: int, cap: int, minimum: int) -> int:
    """The smallest rung >= rows (at least one row, so no array is empty)."""
    need = max(1, min(rows, cap))
    return next(b for b in depth_ladder(cap, minimum) if b >= need)


def _minimums(caps: DepthCaps) -> tuple[int, int]:
    return max(1, caps.clusters // 16), max(1, caps.extra // 64)


def shape_key(length: int, msa_depth: int, model_name: str, settings: ModelSettings,
              *, low_memory: bool = False) -> ShapeKey:
    """The key a target of `length` residues and `msa_depth` MSA rows runs under for a model.

    AlphaFold takes up to `caps.clusters` rows as cluster centres and the rest, up to
    `caps.extra`, as the extra MSA; buckets pad each part to a rung of its ladder.
    """
    caps = depth_caps(model_name, settings.config_size)
    if settings.msa_depth_buckets:
        min_clusters, min_extra = _minimums(caps)
        clusters = depth_bucket(msa_depth, caps.clusters, min_clusters)
        extra = depth_bucket(msa_depth - caps.clusters, caps.extra, min_extra)
    else:
        clusters, extra = caps.clusters, caps.extra
    return ShapeKey(family=family_of(model_name), length=length_bucket(length, settings),
                    clusters=clusters, extra=extra, templates=caps.templates,
                    low_memory=low_memory)


def holds(big: ShapeKey, small: ShapeKey, *, shortest: int | None = None,
          max_waste: float = 0.0) -> bool:
    """`big` can run `small`'s targets: same family and templates, both MSA parts as deep, and
    the same length, or longer while the shortest of them (`shortest` residues) wastes at most
    `max_waste` of `big`'s length on padding."""
    if (replace(big, length=small.length, clusters=small.clusters, extra=small.extra) != small
            or big.clusters < small.clusters or big.extra < small.extra):
        return False
    if big.length == small.length:
        return True
    return (big.length > small.length and shortest is not None
            and padding_waste(shortest, big.length) <= max_waste)


def merge_small_groups(counts: Mapping[ShapeKey, int], max_members: int, *,
                       shortest: Mapping[ShapeKey, int] | None = None, max_waste: float = 0.0,
                       available: Iterable[ShapeKey] = ()) -> dict[ShapeKey, ShapeKey]:
    """The key each key's targets run under: a key with at most `max_members` targets joins
    the nearest key that `holds` it and runs anyway (in `counts`, or `available`: run before,
    so compiled): a deeper MSA bucket of its length, or a longer bucket while its shortest
    target (`shortest[key]` residues) wastes at most `max_waste` on padding.

    A compile costs ~25-30 s on a GPU (measured on an H100) and a small protein's prediction
    0.1-0.4 s, so for a few targets padding beats compiling; padded rows and residues are
    masked, so no result changes. Keys that stay map to themselves; `max_members` 0 merges
    nothing.
    """
    dest = {key: key for key in counts}
    if max_members <= 0:
        return dest
    size, low = dict(counts), dict(shortest or {})
    ready = [k for k in available if k not in counts]
    # smallest first, so a group that grew by a merge can still move on to a bigger one
    for key in sorted(counts, key=lambda k: (k.length, k.clusters, k.extra)):
        if size[key] > max_members:
            continue
        bigger = [k for k in [*counts, *ready] if k != key and dest.get(k, k) == k
                  and holds(k, key, shortest=low.get(key), max_waste=max_waste)]
        if not bigger:
            continue
        target = min(bigger, key=lambda k: (k.length, k.clusters, k.extra))
        for k, d in dest.items():
            if d == key:
                dest[k] = target
        size[target] = size.get(target, 0) + size[key]
        size[key] = 0
        if key in low:
            low[target] = min(low.get(target, low[key]), low[key])
    return dest
