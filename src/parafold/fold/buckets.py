"""Which padded shape each target runs at: length buckets and MSA-depth buckets.

Pure Python so the scheduler can group targets before any accelerator starts. A length bucket
wastes at most `max_length_waste` of its residues on padding for any target of at least
`min_length_bucket` residues; the ladder grows geometrically, so 50-300 residues need about a
dozen shapes. MSA depth buckets are a coarse ladder (factor 4 up to the config's size) so a
shallow MSA is not padded to 512 clusters and 5,120 extra rows; padded rows are masked.
A group may run in a bigger shape that runs anyway (`merge_groups`) when its targets' extra
work there costs less than a compile (`parafold.fold.costs.ShapeCosts`), with up to
`ModelSettings.merge_max_waste` padding.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from parafold.fold.config import TEMPLATES, DepthCaps, depth_caps, family_of, ladder_caps
from parafold.fold.settings import ModelSettings

__all__ = ["ShapeKey", "length_ladder", "length_bucket", "depth_ladder", "depth_bucket",
           "shape_key", "padding_waste", "holds", "merge_groups", "merge_targets",
           "alternative_key", "plan_merges"]

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
              *, templates: bool = True, low_memory: bool = False) -> ShapeKey:
    """The key a target of `length` residues and `msa_depth` MSA rows runs under for a model;
    `templates` false: the target has none, so models 1-2 run it without the template stack
    (`config.family_of`).

    AlphaFold takes up to `caps.clusters` rows as cluster centres and the rest, up to
    `caps.extra`, as the extra MSA, each model its own caps; buckets pad each part to a rung
    of its family's ladder (`config.ladder_caps`), so models whose caps differ (model 1 takes
    508 cluster rows and 5,120 extra ones, model 2 508 and 1,024, model 3 512 and 5,120)
    share a key wherever one rung holds what each of them takes.
    """
    family = family_of(model_name, templates=templates)
    own = depth_caps(model_name, settings.config_size)
    ladder = ladder_caps(family, settings.config_size)
    extra_rows = min(max(msa_depth - own.clusters, 0), own.extra)
    if settings.msa_depth_buckets:
        min_clusters, min_extra = _minimums(ladder)
        clusters = depth_bucket(min(msa_depth, own.clusters), ladder.clusters, min_clusters)
        extra = min(depth_bucket(extra_rows, ladder.extra, min_extra), own.extra)
    else:
        clusters, extra = ladder.clusters, own.extra
    return ShapeKey(family=family, length=length_bucket(length, settings),
                    clusters=clusters, extra=extra, templates=ladder.templates,
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


def merge_groups(counts: Mapping[ShapeKey, int], *,
                 compile_s: float | Callable[[ShapeKey], float],
                 run_s: Callable[[ShapeKey], float],
                 shortest: Mapping[ShapeKey, int] | None = None, max_waste: float = 0.0,
                 available: Iterable[ShapeKey] = (),
                 alternatives: Mapping[ShapeKey, ShapeKey] | None = None
                 ) -> dict[ShapeKey, ShapeKey]:
    """The key each key's targets run under: a group moves to a bigger key that runs anyway
    when the extra device time of its targets there costs less than compiling its own.

    A key's group moves to the key that `holds` it (a deeper MSA bucket of its length, or a
    longer bucket while its shortest target, `shortest[key]` residues, wastes at most
    `max_waste` on padding) and runs anyway (in `counts`, or compiled before: `available`)
    with the least extra time, `targets x (run_s(there) - run_s(own))`, if that is under
    `compile_s` (seconds, or seconds for the key's group: `ShapeCosts.group_compile_s`).
    Smallest keys first, so a group that grew by a merge may move on with all its
    targets (each step is paid for by the compile it saves). A key in `available` is compiled
    already and stays. Padded rows and residues are masked, so no result changes; only the
    work grows. On an H100 a full-model compile took 25-30 s and a small protein 0.05-0.3 s,
    so even a group of a few hundred proteins moves one rung up; `compile_s` 0 merges nothing,
    and a shape `run_s` cannot price (infinite) is never a destination.

    `alternatives[key]`: another key its targets may run under, or in a key that holds that
    one, on the same terms: targets without templates of a template model (a key of the
    no-template family) under the template family's key, their templates masked
    (`alternative_key`), when the template shape runs anyway.
    """
    dest = {key: key for key in counts}
    price = compile_s if callable(compile_s) else (lambda _key: float(compile_s))
    size, low, alt = dict(counts), dict(shortest or {}), dict(alternatives or {})
    compiled = set(available)
    candidates = [*counts, *(k for k in compiled if k not in counts)]
    for key in sorted(counts, key=_size_order):
        if key in compiled:
            continue
        own = [key] if key not in alt else [key, alt[key]]
        options = [(size[key] * (run_s(k) - run_s(key)), _size_order(k), k)
                   for k in candidates if k != key and dest.get(k, k) == k
                   and any(k == o or holds(k, o, shortest=low.get(key), max_waste=max_waste)
                           for o in own)]
        options = [option for option in options if math.isfinite(option[0])]  # unpriced: stay
        if not options:
            continue
        extra_s, _, target = min(options)
        saved_s = price(key)
        if saved_s <= 0 or extra_s >= saved_s:
            continue
        for k, d in dest.items():
            if d == key:
                dest[k] = target
        size[target] = size.get(target, 0) + size[key]
        size[key] = 0
        if key in low:
            low[target] = min(low.get(target, low[key]), low[key])
        if key in alt and target.family == key.family:  # what the target key's group may use
            alt[target] = _cover(alt.get(target, alt[key]), alt[key])
    return dest


def alternative_key(length: int, msa_depth: int, model_name: str, settings: ModelSettings,
                    *, templates: bool) -> ShapeKey | None:
    """The template family's key a target without templates may also run under for a
    template model (its templates then padded and masked, as AlphaFold runs it), for
    `merge_groups`: None when the target has templates or the model takes none."""
    if templates or family_of(model_name) != TEMPLATES:
        return None
    return shape_key(length, msa_depth, model_name, settings, templates=True)


def merge_targets(keys: Sequence[ShapeKey], lengths: Sequence[int], *,
                  compile_s: float | Callable[[ShapeKey], float],
                  run_s: Callable[[ShapeKey], float], max_waste: float = 0.0,
                  available: Iterable[ShapeKey] = (),
                  alternatives: Sequence[ShapeKey | None] | None = None
                  ) -> dict[ShapeKey, ShapeKey]:
    """`merge_groups` for targets given one by one: each target's own key and real length
    (the shortest target of a key bounds its padding), and its `alternative_key` if any (a
    key's alternative holds every one of its targets')."""
    shortest: dict[ShapeKey, int] = {}
    for key, length in zip(keys, lengths, strict=True):
        shortest[key] = min(shortest.get(key, length), length)
    alt: dict[ShapeKey, ShapeKey] = {}
    for key, other in zip(keys, alternatives or [None] * len(keys), strict=True):
        if other is not None:
            alt[key] = _cover(alt.get(key, other), other)
    return merge_groups(Counter(keys), compile_s=compile_s, run_s=run_s, shortest=shortest,
                        max_waste=max_waste, available=available, alternatives=alt)


def plan_merges(targets: Sequence[tuple[int, int, bool]], settings: ModelSettings, *,
                compile_s: float | Callable[[ShapeKey], float],
                run_s: Callable[[ShapeKey], float], available: Iterable[ShapeKey] = ()
                ) -> tuple[list[ShapeKey], dict[ShapeKey, ShapeKey]]:
    """Each target's own key for the run's first model, and where each own key's group runs
    (`merge_targets`, with the template-shape alternatives): the one plan the fold worker, the
    scheduler and the cost model make. Targets are (length, MSA rows, has templates)."""
    first = settings.model_names[0]
    own = [shape_key(length, rows, first, settings, templates=templates)
           for length, rows, templates in targets]
    dest = merge_targets(own, [length for length, _, _ in targets], compile_s=compile_s,
                         run_s=run_s, max_waste=settings.merge_max_waste, available=available,
                         alternatives=[alternative_key(length, rows, first, settings,
                                                       templates=templates)
                                       for length, rows, templates in targets])
    return own, dest


def _cover(a: ShapeKey, b: ShapeKey) -> ShapeKey:
    """The smallest key of `a`'s kind that holds both."""
    return replace(a, length=max(a.length, b.length), clusters=max(a.clusters, b.clusters),
                   extra=max(a.extra, b.extra))


def _size_order(key: ShapeKey) -> tuple[int, int, int]:
    return key.length, key.clusters, key.extra
