"""Job-array shards (`--shard K/N`): every target in exactly one shard; searches split by
sequence (twins together, MMseqs2 batches of different shards not serialized), the GPU stage
split into runs of shapes; `features`, `predict` and `run` each do their part, and problems
that belong to no target are reported by shard 0 alone."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from parafold.cli import app  # noqa: E402
from parafold.errors import InputError  # noqa: E402
from parafold.featureset import FeatureSet, read_feature_set, write_feature_set  # noqa: E402
from parafold.inputs import read_targets, sequence_hash  # noqa: E402
from parafold.shards import Shard, cut_by_work  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


def _sequences(n: int, seed: int = 0, lengths: tuple[int, int] = (20, 60)) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA), int(rng.integers(*lengths)))) for _ in range(n)]


# --- the cuts ---


def test_shard_is_parsed_from_k_of_n_and_bad_values_name_the_option():
    assert Shard.parse("3/10") == Shard(3, 10)
    assert Shard.parse(" 0 / 1 ") == Shard(0, 1)
    assert str(Shard(2, 5)) == "shard 2/5" and Shard(0, 5).reports_shared
    assert not Shard(1, 5).reports_shared
    for bad in ("10/10", "1/0", "a/b", "-1/3", "3", "1/2/3"):
        with pytest.raises(InputError, match="--shard"):
            Shard.parse(bad)
    with pytest.raises(InputError, match="SLURM_ARRAY_TASK_ID - 1"):
        Shard.parse("4/4")  # an array numbered 1..4


def test_hash_shards_cover_each_item_once_keep_twins_together_and_stay_put():
    seqs = _sequences(300)
    items = [(f"t{i}", s) for i, s in enumerate(seqs)] + [("twin", seqs[7]), ("twin2", seqs[7])]
    for count in (1, 2, 3, 7):
        parts = [Shard(k, count).by_hash(items, key=lambda it: sequence_hash(it[1]))
                 for k in range(count)]
        names = [it[0] for part in parts for it in part]
        assert sorted(names) == sorted(it[0] for it in items), count  # each exactly once
        home = {it[0]: k for k, part in enumerate(parts) for it in part}
        assert home["t7"] == home["twin"] == home["twin2"], count
        assert min(len(p) for p in parts) > 0.6 * len(items) / count, count
        # a record added to the input moves no other record
        more = items + [("new", "MKTAYIAKQR")]
        again = [Shard(k, count).by_hash(more, key=lambda it: sequence_hash(it[1]))
                 for k in range(count)]
        assert all({it[0] for it in a} - {"new"} == {it[0] for it in p}
                   for a, p in zip(again, parts, strict=True))


def test_work_shards_are_runs_of_the_order_with_about_equal_work():
    rng = np.random.default_rng(1)
    items = [(f"t{i}", float(rng.uniform(1, 50))) for i in range(101)]
    order = sorted(items, key=lambda it: it[1])
    total, biggest = sum(w for _, w in items), max(w for _, w in items)
    for count in (1, 2, 4, 9):
        parts = cut_by_work(items, count, order=lambda it: it[1], work=lambda it: it[1])
        assert [it for part in parts for it in part] == order, count  # runs, in order, all
        for part in parts:
            assert abs(sum(w for _, w in part) - total / count) <= biggest, count
    # work that cannot be priced: every item weighs the same
    unpriced = cut_by_work(items, 2, order=lambda it: it[1], work=lambda it: float("inf"))[0]
    assert unpriced == order[:50] or unpriced == order[:51]


def test_a_pinned_plan_leaves_no_target_between_tasks_when_the_set_grows(tmp_path):
    first, grown = list(range(1, 11)), list(range(1, 15))  # 4 more sets after task 0 started
    order = {"order": lambda i: i, "work": lambda i: 1.0}
    # unpinned, the cut moves: 6 and 7 fall between task 0's old range and task 1's new one
    unpinned = set(cut_by_work(first, 2, **order)[0]) | set(cut_by_work(grown, 2, **order)[1])
    assert unpinned == set(grown) - {6, 7}

    plan = tmp_path / "plan" / "predict-2.json"

    def task(k: int, items: list[int]) -> tuple[list[int], str]:
        return Shard(k, 2).pinned(plan, items, name=str,
                                  cut=lambda: cut_by_work(items, 2, **order))

    zero, how = task(0, first)
    assert zero == [1, 2, 3, 4, 5] and "a new plan" in how
    one, how = task(1, grown)
    assert "the plan in" in how and "4 not in it go by hash" in how
    assert {6, 7, 8, 9, 10} <= set(one)
    zero_again, _ = task(0, grown)  # the rerun of task 0 takes what is its own of the new sets
    assert sorted(zero_again + one) == grown
    with pytest.raises(InputError, match="plan for 2 shards"):
        Shard(0, 3).pinned(plan, first, name=str, cut=list)


def test_tasks_racing_without_a_lock_share_the_plan_the_first_wrote(tmp_path):
    """On a mount without locks two tasks may both find no plan and both cut: the plan is
    created only if absent, and each task uses the file, not its own cut, so no target falls
    between them (task 1 cut the grown set; task 0's plan, written first, wins)."""
    from parafold.store import create_json_once

    first, grown = list(range(1, 11)), list(range(1, 15))
    order = {"order": lambda i: i, "work": lambda i: 1.0}
    plan = tmp_path / "predict-2.json"

    def racing_cut() -> list[list[int]]:  # task 0 writes its plan while task 1 cuts
        assert create_json_once(plan, {"count": 2, "parts": {
            str(i): k for k, part in enumerate(cut_by_work(first, 2, **order)) for i in part}})
        return cut_by_work(grown, 2, **order)

    one, how = Shard(1, 2).pinned(plan, grown, name=str, cut=racing_cut)
    assert "the plan in" in how
    zero, _ = Shard(0, 2).pinned(plan, grown, name=str, cut=list)
    assert sorted(zero + one) == grown and not set(zero) & set(one)
    assert not create_json_once(plan, {"count": 2, "parts": {}})
    assert not list(tmp_path.glob(".*.part"))


# --- features ---


def test_features_shards_share_an_out_and_each_searches_its_own_sequences(tmp_path):
    seqs = _sequences(9, seed=2)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(seqs))
                     + f">twin\n{seqs[4]}\n>broken\nMK1TA\n")
    out, runner = tmp_path / "out", CliRunner()
    names: dict[int, set[str]] = {}
    for k in range(3):
        res = runner.invoke(app, ["features", str(fasta), "-o", str(out), "--msa-mode",
                                  "single_sequence", "--cpus", "1", "--shard", f"{k}/3"])
        # the bad record is told once, by shard 0, whose exit code says so
        assert res.exit_code == (1 if k == 0 else 0), res.output
        assert ("broken" in res.output) == (k == 0), res.output
        assert f"shard {k}/3: " in res.output
        names[k] = {t.name for t in Shard(k, 3).by_hash(read_targets(fasta).targets,
                                                         key=lambda t: t.sequence_hash)}
    everyone = {t.name for t in read_targets(fasta).targets}
    assert set().union(*names.values()) == everyone and sum(map(len, names.values())) == 10
    assert any({"p4", "twin"} <= part for part in names.values())
    for name in everyone:
        assert read_feature_set(out / name).sequence
    res = runner.invoke(app, ["features", str(fasta), "-o", str(out), "--shard", "3/3"])
    assert res.exit_code == 2 and "0..2" in res.output


def test_mmseqs_batches_of_other_shards_are_not_held_up_by_a_running_batch(synthetic_db,
                                                                            tmp_path):
    """One cache: an unsharded batch waits for the running batch's lock; a shard's does not."""
    from parafold.search.budget import CpuBudget
    from parafold.search.databases import find_databases
    from parafold.search.runner import featurize_batch
    from parafold.search.settings import SearchSettings
    from parafold.store import file_lock

    queries = list(read_targets(Path(synthetic_db) / "queries.fasta").targets)
    cache = tmp_path / "cache"
    cache.mkdir()

    def batch(shard: Shard | None, results: list[object]) -> threading.Thread:
        targets = queries[:2] if shard is not None else queries[2:4]  # not cached yet

        def go() -> None:
            results.extend(featurize_batch(
                targets, out_dir=tmp_path / f"out{shard}", budget=CpuBudget(2),
                databases=find_databases(Path(synthetic_db), msa_mode="mmseqs"),
                settings=SearchSettings(msa_mode="mmseqs"), cache_dir=cache, shard=shard))
        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread

    sharded: list[object] = []
    plain: list[object] = []
    # batches of an unsharded run and of shard 0 are searching
    with file_lock(cache / ".mmseqs-batch.lock"), file_lock(cache / ".mmseqs-batch-0-of-2.lock"):
        thread = batch(Shard(1, 2), sharded)
        thread.join(timeout=120)
        assert not thread.is_alive() and len(sharded) == 2
        assert all(isinstance(r, FeatureSet) for r in sharded), sharded
        waiting = batch(None, plain)
        waiting.join(timeout=3)
        assert waiting.is_alive() and not plain  # held by the lock
    waiting.join(timeout=120)
    assert len(plain) == 2 and all(isinstance(r, FeatureSet) for r in plain), plain


# --- predict ---


def _feature_sets(lengths_depths: list[tuple[int, int]]) -> list[FeatureSet]:
    seqs = _sequences(len(lengths_depths), seed=3, lengths=(300, 301))
    return [FeatureSet(name=f"t{i:03d}", target_id=f"t{i}", sequence=seqs[i][:length],
                       path=Path("/nonexistent"), msa_depth=depth, num_templates=0)
            for i, (length, depth) in enumerate(lengths_depths)]


def test_predict_shards_are_runs_of_shapes_so_each_compiles_few():
    from parafold.fold.buckets import shape_key
    from parafold.fold.costs import cut_by_cost, shape_costs
    from parafold.fold.settings import ModelSettings

    rng = np.random.default_rng(4)
    sets = _feature_sets([(int(rng.integers(30, 290)), int(rng.integers(1, 400)))
                          for _ in range(120)])
    settings = ModelSettings(config_size="full", models=(1,), compile_cache_dir=None)
    costs = shape_costs(settings, "gpu")
    own = {fs.name: shape_key(fs.length, fs.msa_depth, "model_1_ptm", settings,
                              templates=fs.num_templates > 0) for fs in sets}
    count = 4
    cut = cut_by_cost(sets, count, settings, "gpu")
    parts = [run.sets for run in cut]
    by_hash = [Shard(k, count).by_hash(sets, key=lambda fs: fs.name) for k in range(count)]
    work = [sum(costs.run_s(own[fs.name]) for fs in part) for part in parts]
    assert work == pytest.approx([run.seconds for run in cut])
    assert [run.shapes for run in cut] == [frozenset(own[fs.name] for fs in p) for p in parts]
    biggest = max(costs.run_s(k) for k in own.values())
    assert sorted(fs.name for part in parts for fs in part) == sorted(own)
    shapes = len(set(own.values()))
    # runs of the shape order: shards share at most the shape at each cut
    assert sum(len({own[fs.name] for fs in part}) for part in parts) <= shapes + count - 1
    # cut at random, every shard would compile most shapes
    assert sum(len({own[fs.name] for fs in part}) for part in by_hash) > 2 * shapes
    assert max(work) - min(work) <= 2 * biggest


def test_predict_shards_write_one_out_together_and_an_empty_shard_is_no_failure(
        tmp_path, tmp_path_factory):
    from parafold.fold.synthetic import make_features

    runner = CliRunner()
    res = runner.invoke(app, ["params", "random", str(tmp_path / "w"), "--preset", "tiny",
                              "--models", "3"])
    assert res.exit_code == 0, res.output
    for name, seq in (("short", "MKTAYIAKQRQISFVKSHFS"), ("long", "MKTAYIAKQRQISFVKSHFSRQ" * 3)):
        write_feature_set(tmp_path / "feats" / name, name=name, target_id=name,
                          features=make_features(seq, 12))
    cache = tmp_path_factory.getbasetemp() / "jax-cache"
    written: dict[int, set[str]] = {}
    for k in range(3):
        res = runner.invoke(app, [
            "predict", str(tmp_path / "feats"), "-o", str(tmp_path / "out"), "--params-dir",
            str(tmp_path / "w"), "--models", "3", "--num-recycle", "0", "--float32",
            "--compile-cache", str(cache), "--shard", f"{k}/3"])
        assert res.exit_code == 0, res.output
        assert f"shard {k}/3: " in res.output
        written[k] = {line.split("\t")[0] for line in res.output.splitlines()
                      if line.endswith("\tok")}
    assert sorted(n for names in written.values() for n in names) == ["long", "short"]
    assert any(not names for names in written.values())  # 2 targets, 3 shards
    assert (tmp_path / "out" / ".parafold-shards" / "predict-3.json").is_file()
    for name in ("short", "long"):
        assert (tmp_path / "out" / name / "ranked_0.pdb").is_file()


# --- run ---


def test_run_reads_only_its_shard_and_leaves_input_problems_to_shard_0(tmp_path):
    from parafold.fold.settings import ModelSettings
    from parafold.pipeline import RunSettings, _read_input
    from parafold.search.settings import SearchSettings

    fasta = tmp_path / "in.fasta"
    seqs = _sequences(12, seed=5)
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)) + ">bad\nMK*Z9\n")
    parts = []
    for k in range(3):
        settings = RunSettings(input=fasta, out=tmp_path / f"out{k}", params_dir=tmp_path,
                               search=SearchSettings(msa_mode="single_sequence"),
                               model=ModelSettings(config_size="tiny"), shard=Shard(k, 3))
        targets, problems = _read_input(settings)
        assert bool(problems) == (k == 0)
        parts.append({t.name for t in targets})
    assert set().union(*parts) == {f"r{i}" for i in range(12)}
    assert sum(map(len, parts)) == 12


def test_run_of_one_shard_folds_its_targets_only(tmp_path, tmp_path_factory):
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.ledger import Ledger
    from test_pipeline import PARAFOLD, check_complete, jax_cache_home

    write_random_params(tmp_path / "params", ModelSettings(config_size="tiny", models=(1,)))
    fasta = tmp_path / "in.fasta"
    seqs = _sequences(5, seed=6, lengths=(30, 34))
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)) + ">bad\nMK*Z9\n")
    shard = Shard(1, 2)
    mine = sorted(t.name for t in shard.by_hash(read_targets(fasta).targets,
                                                 key=lambda t: t.sequence_hash))
    assert 0 < len(mine) < 5
    out = tmp_path / "out1"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XDG_CACHE_HOME": str(jax_cache_home(tmp_path_factory))}
    proc = subprocess.run(
        [PARAFOLD, "run", str(fasta), "-o", str(out), "--params-dir", str(tmp_path / "params"),
         "--msa-mode", "single_sequence", "--config", "tiny", "--models", "1",
         "--num-recycle", "0", "--float32", "--cpus", "2", "--max-wait", "1", "--no-progress",
         "--no-plots", "--shard", "1/2"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # the bad record is shard 0's
    check_complete(out, mine)
    with Ledger(out, readonly=True) as ledger:
        assert sorted(r.name for r in ledger.targets()) == mine
