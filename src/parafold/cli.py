"""The `parafold` command line: parse, call, print. Work lives in the modules it calls."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="parafold",
    help="High-throughput AlphaFold2: CPU searches and GPU inference, split, overlapped, cached.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from parafold.lifecycle import stop_on_sigterm

    stop_on_sigterm()


def _interrupted(exc: BaseException, kept: str) -> int:
    """Say how a command ended on Ctrl-C or SIGTERM and what is kept; its exit code."""
    from parafold.lifecycle import Terminated, interrupted_code

    how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    typer.echo(f"{how}; rerun the same command to resume ({kept})", err=True)
    return interrupted_code(exc)


# Each stage registers its commands below, in its own section. Keep imports of heavy modules
# (jax, alphafold.model) inside the command functions so `parafold --help` stays fast.

# --- search stage (features, databases, testdata) ---

from pathlib import Path  # noqa: E402  (section-local imports; typer reads the annotations)
from typing import Annotated, Any  # noqa: E402

from parafold.search.databases import DatabaseSet  # noqa: E402  (light: no alphafold import)

_DB_HELP = "Override one database (file, HH-suite prefix, or a folder holding it)."
databases_app = typer.Typer(help="Inspect the sequence and structure databases.",
                            no_args_is_help=True)
app.add_typer(databases_app, name="databases")


_MSA_MODE_HELP = ("classic (jackhmmer/hhblits/hhsearch), mmseqs (MMseqs2 batch search), "
                  "precomputed (--msa-dir), or single_sequence (no search). Default: "
                  "precomputed when INPUT holds .a3m files, else classic.")
_MMSEQS_S_HELP = ("MMseqs2 sensitivity -s (mmseqs mode; lower is faster and finds fewer remote "
                  "homologs). Default: ColabFold's k-mer thresholds (--k-score seq:96,prof:80).")
_MSA_DIR_HELP = ("Folder of <id>.a3m or <id>.sto MSAs (precomputed mode; default: INPUT's "
                 "folder when INPUT holds .a3m files).")


_Templates = Annotated[bool, typer.Option("--templates/--no-templates", help="Search templates and give them to models 1 and 2, as AlphaFold does (default). --no-templates skips the template search, its databases and the mmCIF parsing (ColabFold's default).")]


def _database_set(db_dir: Path | None, preset: str,
                  overrides: dict[str, Path | None], msa_mode: str = "classic",
                  templates: bool = True) -> DatabaseSet:
    from parafold.errors import InputError
    from parafold.search.databases import find_databases

    try:
        return find_databases(db_dir, preset, dict(overrides), msa_mode=msa_mode,
                              templates=templates)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@databases_app.command("check")
def databases_check(
    db_dir: Annotated[Path, typer.Argument(help="Folder with the AlphaFold database layout.")],
    db_preset: Annotated[str, typer.Option(help="full_dbs or reduced_dbs.")] = "full_dbs",
    msa_mode: Annotated[str, typer.Option("--msa-mode", help="The MSA mode to check for: classic or mmseqs.")] = "classic",
    templates: _Templates = True,
) -> None:
    """Print which databases are present or missing, and each one's fingerprint; exit 1 when
    one that the preset and MSA mode need is missing."""
    from parafold.search.databases import TEMPLATE_DATABASES, check_databases, only_templates

    dbs = _database_set(db_dir, db_preset, {}, msa_mode, templates)
    missing: list[str] = []
    for st in check_databases(dbs):
        need = "required" if st.required else "optional"
        if st.present:
            typer.echo(f"present  {st.name:<11} {need:<8} {st.fingerprint}  {st.path}")
        elif not templates and st.name in TEMPLATE_DATABASES:
            typer.echo(f"unused   {st.name:<11} {'-':<8} {'-':<64}  (--no-templates)")
        else:
            missing += [st.name] if st.required else []
            typer.echo(f"MISSING  {st.name:<11} {need:<8} {'-':<64}  (not under {db_dir})")
    if missing:
        hint = " (--no-templates runs without them)" if only_templates(missing) else ""
        typer.echo(f"{len(missing)} database(s) needed by {dbs.needed_by} are missing{hint}",
                   err=True)
        raise typer.Exit(1)


def _msa_mode_and_dir(input_path: Path, msa_mode: str | None,
                      msa_dir: Path | None) -> tuple[str, str]:
    """The MSA mode and precomputed folder, defaulted from INPUT when it holds A3M files.

    Raises:
        InputError: INPUT mixes A3M and FASTA files and no mode says which is meant.
    """
    from parafold.errors import InputError
    from parafold.inputs import a3m_share

    share = a3m_share(input_path)
    if msa_mode is None and share == "some":
        raise InputError(
            f"{input_path}: holds both A3M files and FASTA or CSV files; say which MSAs to "
            "use with --msa-mode: precomputed (every record's <id>.a3m, from --msa-dir or "
            "this folder) or classic/mmseqs (search every record, the A3M files' queries too)")
    mode = msa_mode or ("precomputed" if share == "all" else "classic")
    folder = msa_dir
    if folder is None and mode == "precomputed" and share != "none":
        folder = input_path if input_path.is_dir() else input_path.parent
    return mode, str(folder) if folder is not None else ""


def _msa_settings(input_path: Path, msa_mode: str | None, msa_dir: Path | None,
                  mmseqs_sensitivity: float | None) -> dict[str, Any]:
    """The MSA fields of SearchSettings from the command line (`run`, `features`)."""
    mode, folder = _msa_mode_and_dir(input_path, msa_mode, msa_dir)
    return {"msa_mode": mode, "msa_dir": folder, "mmseqs_sensitivity": mmseqs_sensitivity}


_Shard = Annotated[str | None, typer.Option("--shard", metavar="K/N", help="Only part K of N (0-based) of the targets: one task of a job array, e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT. Searches split by sequence; predict splits by shape, so each task compiles only its own shapes.")]


@app.command("features")
def features_cmd(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="FASTA file (may be .gz, .bz2, .xz), folder of FASTA files, CSV id,sequence, or A3M files.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (one subfolder per target).")],
    db_dir: Annotated[Path | None, typer.Option("--db-dir", help="AlphaFold database folder.")] = None,
    db_preset: Annotated[str, typer.Option(help="full_dbs or reduced_dbs.")] = "full_dbs",
    uniref90: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    mgnify: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    bfd: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    uniref30: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    small_bfd: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    pdb70: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    pdb_mmcif: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    cpus: Annotated[int, typer.Option(help="Core budget for all searches (0: every core).")] = 0,
    threads_per_search: Annotated[int, typer.Option(help="Threads per search (0: from the budget).")] = 0,
    max_template_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD; newer templates are ignored.")] = None,
    templates: _Templates = True,
    timeout: Annotated[float, typer.Option(help="Seconds before a search is killed.")] = 86_400.0,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default OUT/.cache).")] = None,
    write_pkl: Annotated[bool, typer.Option("--write-pkl", help="Also write AlphaFold's features.pkl.")] = False,
    msa_mode: Annotated[str | None, typer.Option("--msa-mode", help=_MSA_MODE_HELP)] = None,
    msa_dir: Annotated[Path | None, typer.Option("--msa-dir", help=_MSA_DIR_HELP)] = None,
    mmseqs_sensitivity: Annotated[float | None, typer.Option(help=_MMSEQS_S_HELP)] = None,
    shard: _Shard = None,
) -> None:
    """CPU stage: MSA and template searches, then AlphaFold features, for every input record.

    Tasks of a job array may share OUT and its cache, each with its own --shard.
    """
    from parafold.errors import DatabaseNotFoundError, InputError
    from parafold.inputs import read_targets
    from parafold.lifecycle import drain_on_sigusr1
    from parafold.search.budget import default_cpus
    from parafold.search.scheduler import featurize_many
    from parafold.search.settings import DEFAULT_MAX_TEMPLATE_DATE, SearchSettings
    from parafold.shards import Shard

    drain_on_sigusr1()  # before any search starts: they inherit the block

    try:
        if cpus < 0:
            raise InputError(f"--cpus must be >= 0, got {cpus}")
        part = Shard.parse(shard) if shard is not None else None
        parsed = read_targets(input_path)
        settings = SearchSettings(preset=db_preset, timeout_s=timeout,
                                  threads_per_search=threads_per_search,
                                  max_template_date=max_template_date or DEFAULT_MAX_TEMPLATE_DATE,
                                  use_templates=templates,
                                  **_msa_settings(input_path, msa_mode, msa_dir,
                                                  mmseqs_sensitivity))
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    targets, problems = list(parsed.targets), list(parsed.problems)
    if part is not None:
        targets, problems = part.own_targets(targets), part.problems_to_tell(problems)
        typer.echo(f"{part}: {len(targets)} of the input's {len(parsed.targets)} targets")
    for problem in problems:
        typer.echo(f"input problem: {problem}", err=True)
    overrides = {"uniref90": uniref90, "mgnify": mgnify, "bfd": bfd, "uniref30": uniref30,
                 "small_bfd": small_bfd, "pdb70": pdb70, "pdb_mmcif": pdb_mmcif}
    dbs = _database_set(db_dir, db_preset, overrides, settings.msa_mode, settings.use_templates)
    try:
        outcomes = featurize_many(
            targets, out_dir=out, databases=dbs, settings=settings,
            cpus=cpus or default_cpus(), cache_dir=cache_dir or out / ".cache",
            write_pkl=write_pkl, shard=part)
    except DatabaseNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the searches' tools die with us
        from parafold.lifecycle import exit_interrupted

        exit_interrupted(_interrupted(
            exc, f"finished features in {out} and searches in its cache are kept"))
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        verb = "stopped" if o.stopped_early else "failed"
        typer.echo(f"{verb}: {o.target.id} ({o.target.source}): {o.error}", err=True)
    reused = sum(1 for o in outcomes if o.ok and o.reused)
    stopped = sum(1 for o in failed if o.stopped_early)
    typer.echo(f"{len(outcomes) - len(failed)} of {len(outcomes)} targets have features in {out} "
               f"({reused} reused), {len(failed) - stopped} failed, {stopped} stopped, "
               f"{len(problems)} bad input record(s)")
    _exit_if_stopped_early(out, [o.stopped_early for o in failed])
    # an empty shard (more tasks than sequences) is no failure of its task
    if failed or problems or not (outcomes or part is not None and parsed.targets):
        raise typer.Exit(1)


def _exit_if_stopped_early(out: Path, stopped_early: list[bool]) -> None:
    """Targets that a full disk, a spent quota or a drain (SIGUSR1) stopped: say what to do,
    exit 75 (sysexits' EX_TEMPFAIL), so a job script can tell it from failed targets."""
    from parafold.errors import storage_full_advice
    from parafold.lifecycle import DRAIN_ADVICE, EXIT_STOPPED_EARLY, drain_requested

    if any(stopped_early):
        drain = drain_requested()
        why = (f"stopped early ({drain}). {DRAIN_ADVICE}" if drain is not None else
               f"stopped by a full disk or a spent quota. {storage_full_advice(out)}")
        typer.echo(f"{sum(stopped_early)} target(s) {why}", err=True)
        raise typer.Exit(EXIT_STOPPED_EARLY)


@app.command("testdata")
def testdata_cmd(
    out: Annotated[Path, typer.Argument(help="Folder to write (the AlphaFold database layout).")],
    families: Annotated[int, typer.Option(help="Planted protein families (one query each).")] = 8,
    sequences: Annotated[int | None, typer.Option(
        help="Total sequence ids, members plus unrelated (default: a tiny set).")] = None,
    seed: Annotated[int, typer.Option(help="Same seed and options, same databases.")] = 0,
    mmseqs: Annotated[bool, typer.Option(help="Also write and index the MMseqs2 databases (mmseqs/uniref30_db, env_db, pdb_seqres_db).")] = True,
    uniref90_redundancy: Annotated[int, typer.Option(help="Unrelated uniref90 sequences come in clusters of this many relatives (real UniRef90: about 5 per UniRef30 cluster); 1: all unrelated.")] = 1,
) -> None:
    """Synthetic databases with planted families, queries.fasta and truth.tsv (for tests, demo
    and benchmarks)."""
    from parafold.errors import PipelineError
    from parafold.testdata import build_testdata

    try:
        s = build_testdata(out, families=families, sequences=sequences, seed=seed, mmseqs=mmseqs,
                           uniref90_redundancy=uniref90_redundancy)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    how = "reused existing build" if s.reused else f"built in {s.elapsed_s:.1f} s"
    typer.echo(f"{s.root}: {s.sequences} sequences ({s.family_members} in {s.families} "
               f"families, {s.unrelated} unrelated), {s.templates} family templates; {how}")
    typer.echo("  " + ", ".join(f"{db} {n}" for db, n in sorted(s.counts.items())))
    typer.echo(f"  queries: {s.queries}  truth: {s.truth}")

# --- GPU stage (predict, params) ---

params_app = typer.Typer(help="Model parameters: random weights of the real architecture.",
                         no_args_is_help=True)
app.add_typer(params_app, name="params")


@params_app.command("random")
def params_random(
    params_dir: Annotated[Path, typer.Argument(help="Folder to hold params/params_model_N[_ptm].npz.")],
    preset: Annotated[str, typer.Option("--preset", help="Architecture size: full or tiny.")] = "full",
    models: Annotated[str, typer.Option("--models", help="Model numbers, e.g. 1,2,3,4,5.")] = "1,2,3,4,5",
    model_preset: Annotated[str, typer.Option("--model-preset", help="monomer or monomer_ptm.")] = "monomer_ptm",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random draws.")] = 0,
) -> None:
    """Write random weights (every tensor drawn) in AlphaFold's params layout."""
    from parafold.errors import PipelineError
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings, parse_model_numbers

    try:
        settings = ModelSettings(model_preset=model_preset, models=parse_model_numbers(models),
                                 config_size=preset, compile_cache_dir=None)
        paths = write_random_params(params_dir, settings, seed=seed)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for path in paths:
        typer.echo(str(path))


# GPU-stage options shared by `predict` and `run` (typer needs each option on each command).
_Tolerance = Annotated[float, typer.Option("--recycle-early-stop-tolerance", help="Stop recycling when CA distances change less (A).")]
_RandomSeed = Annotated[int, typer.Option("--random-seed", help="Base random seed.")]
_Pallas = Annotated[bool | None, typer.Option("--fused-kernels/--no-fused-kernels", help="Force fused kernels on or off (default: auto).")]
_CompileCache = Annotated[Path | None, typer.Option("--compile-cache", help="Persistent compilation cache folder (default ~/.cache/parafold/jax; on a cluster, a shared folder lets every node reuse what one compiled).")]
_NoCompileCache = Annotated[bool, typer.Option("--no-compile-cache", help="Do not use a persistent compilation cache.")]
_CompileCacheMaxGb = Annotated[float, typer.Option("--compile-cache-max-gb", help="Bound on the compilation cache folder: a fold worker that finds more removes the least recently used compiled shapes first (0: no bound).")]
_NoDepthBuckets = Annotated[bool, typer.Option("--no-msa-depth-buckets", help="Pad every MSA to the config's full sizes.")]
_SaveRaw = Annotated[bool, typer.Option("--save-raw", help="Also write result_<model>.pkl.")]
_CompileAhead = Annotated[int, typer.Option("--compile-ahead", help="Threads compiling the next shapes while the current ones run (0: compile each shape when first needed; more than 1 slows each compile on a GPU).")]
_CompileCost = Annotated[float | None, typer.Option("--compile-cost", help="Seconds one compile is worth: a group of targets runs in a bigger shape that runs anyway (a deeper MSA bucket of its length, or a longer bucket within --merge-max-waste) when its extra device time there is less (default: the figure measured for the GPU or CPU; 0: never).")]
_MergeMaxWaste = Annotated[float, typer.Option("--merge-max-waste", help="Most padding a merged target's length may get (fraction of the bucket).")]
_ModelsToRelax = Annotated[str, typer.Option("--models-to-relax", help="Amber-relax predictions once written, as AlphaFold does: none (default: relaxing takes seconds to minutes of CPU a structure, far more than its prediction on a GPU), best (AlphaFold's default) or all. Writes relaxed_<model>.pdb, ranked_N.pdb/.cif from the relaxed structure and relax_metrics.json. `parafold relax` does it later, on CPU nodes.")]


def _model_settings(params_dir: Path, *, models: str, config: str | None,
                    compile_cache: Path | None, no_compile_cache: bool,
                    no_depth_buckets: bool, tolerance: float, compile_cost: float | None,
                    compile_cache_max_gb: float, **fields: Any) -> Any:
    """The ModelSettings both commands build from their options (other fields pass through).

    Raises:
        InputError: a bad value; ParamsError: an unreadable params record.
    """
    from parafold.errors import InputError
    from parafold.fold.settings import ModelSettings, default_compile_cache_dir, parse_model_numbers

    cache_dir = None if no_compile_cache else (compile_cache or default_compile_cache_dir())
    if compile_cache_max_gb < 0:
        raise InputError(f"--compile-cache-max-gb must be >= 0, got {compile_cache_max_gb}")
    return ModelSettings(models=parse_model_numbers(models),
                         compile_cache_max_bytes=int(compile_cache_max_gb * 1e9) or None,
                         config_size=_predict_config(params_dir, config),
                         compile_cache_dir=cache_dir, msa_depth_buckets=not no_depth_buckets,
                         recycle_early_stop_tolerance=tolerance, compile_cost_s=compile_cost,
                         **fields)


def _predict_config(params_dir: Path, config: str | None) -> str:
    from parafold.errors import InputError
    from parafold.fold.params import read_params_info

    recorded = (read_params_info(params_dir) or {}).get("config")
    if config is None:
        if recorded and recorded != "full":  # said, so a test config is never taken unseen
            typer.echo(f"model config: {recorded} (recorded with the params in {params_dir})")
        return str(recorded or "full")
    if recorded and recorded != config:
        raise InputError(f"{params_dir}: params were written for the {recorded} config, "
                         f"not --config {config}")
    return config


@app.command("predict")
def predict(
    features: Annotated[list[Path], typer.Argument(help="Output folder of `parafold features`, or folders holding features.pkl.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output folder (one subfolder per target).")],
    params_dir: Annotated[Path, typer.Option("--params-dir", help="Folder with params/params_model_N.npz.")],
    model_preset: Annotated[str, typer.Option("--model-preset", help="monomer or monomer_ptm.")] = "monomer_ptm",
    models: Annotated[str, typer.Option("--models", help="Model numbers, e.g. 1,2,3,4,5.")] = "1,2,3,4,5",
    num_recycle: Annotated[int, typer.Option("--num-recycle", help="Recycling iterations after the first.")] = 3,
    tolerance: _Tolerance = 0.0,
    num_seeds: Annotated[int, typer.Option("--num-seeds", help="Predictions per model.")] = 1,
    random_seed: _RandomSeed = 0,
    config: Annotated[str | None, typer.Option("--config", help="full or tiny (default: what the params folder records, else full).")] = None,
    pallas: _Pallas = None,
    float32: Annotated[bool, typer.Option("--float32", help="Run the model in float32.")] = False,
    compile_cache: _CompileCache = None,
    no_compile_cache: _NoCompileCache = False,
    compile_cache_max_gb: _CompileCacheMaxGb = 20.0,
    executable_cache: Annotated[bool, typer.Option("--executable-cache", help="Experimental: also keep serialized executables in the compile cache, so a warm process skips tracing and lowering.")] = False,
    no_depth_buckets: _NoDepthBuckets = False,
    save_raw: _SaveRaw = False,
    trust_pickles: Annotated[bool, typer.Option("--trust-pickles", help="Load features.pkl files (a pickle can run code).")] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most proteins of one shape per forward pass (the memory model may choose fewer; 1 on the CPU unless --force-batch).")] = 32,
    force_batch: Annotated[bool, typer.Option("--force-batch", help="Batch proteins on the CPU too.")] = False,
    host_workers: Annotated[int | None, typer.Option("--host-workers", help="Feature-processing processes per GPU (default: the host's cores but 3, shared out between the GPUs, at most 16; inline on the CPU). Deep MSAs need many: benchmarks/host_features.py.")] = None,
    compile_ahead: _CompileAhead = 1,
    compile_cost: _CompileCost = None,
    merge_max_waste: _MergeMaxWaste = 0.5,
    models_to_relax: _ModelsToRelax = "none",
    shard: _Shard = None,
    gpus: Annotated[str, typer.Option(help="GPUs to use: 'all' (default: a fold process on each, every one taking neighbouring shapes), 'none', or ids like 0,1.")] = "all",
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where finished predictions are indexed (default OUT/.cache); runs sharing it copy a target predicted before with the same features and settings instead of predicting it again.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what predict would do: targets done and left, the shapes and compiles they need, and the GPU time they would take (modelled). Writes nothing.")] = False,
) -> None:
    """Predict structures from features (GPU stage); exit 0 only if every target succeeded.

    Tasks of a job array may share OUT, each with its own --shard. The first task pins the cuts
    in OUT/.parafold-shards/predict-N.json for the others (delete it to cut anew).
    """
    from dataclasses import replace

    from parafold.engine.base import detect_gpus, parse_gpus
    from parafold.engine.devices import predict_on
    from parafold.errors import PipelineError
    from parafold.featureset import collect_feature_sets
    from parafold.fold.costs import cut_by_cost
    from parafold.fold.reuse import prediction_fingerprint
    from parafold.fold.twins import plan_twins, with_twins
    from parafold.lifecycle import drain_on_sigusr1, exit_interrupted
    from parafold.shards import Shard

    drain_on_sigusr1()  # before any fold process starts: they inherit the block
    log = logging.getLogger("parafold.predict")
    try:
        settings = _model_settings(
            params_dir, models=models, config=config, compile_cache=compile_cache,
            no_compile_cache=no_compile_cache, no_depth_buckets=no_depth_buckets,
            compile_cache_max_gb=compile_cache_max_gb,
            tolerance=tolerance, compile_cost=compile_cost, model_preset=model_preset,
            num_recycle=num_recycle, num_seeds=num_seeds, random_seed=random_seed,
            use_pallas=pallas, float32=float32, executable_cache=executable_cache,
            save_raw=save_raw, max_batch=max_batch, force_batch=force_batch,
            host_workers=host_workers, compile_ahead=compile_ahead,
            merge_max_waste=merge_max_waste, models_to_relax=models_to_relax)
        settings = replace(settings, prediction_cache_dir=cache_dir or out / ".cache")
        part = Shard.parse(shard) if shard is not None else None
        chosen = parse_gpus(gpus)
        devices = detect_gpus() if chosen is None else chosen
        sets, problems = collect_feature_sets(features, trust_pickles=trust_pickles)
        if part is not None:
            problems = part.problems_to_tell(problems)
        for problem in problems:
            log.error("%s", problem)
        if not sets:
            if not problems:
                searched = ", ".join(str(root) for root in features)
                typer.echo(f"error: no feature sets found in {searched}: expected "
                           "features.json + features.npz (or features.pkl with --trust-pickles) "
                           "in each folder given or in its immediate subfolders", err=True)
            raise typer.Exit(2)
        if dry_run:
            for line in _predict_preview(sets, out, params_dir, settings,
                                         "cpu" if chosen == () else "gpu"):
                typer.echo(line)
            return
        if part is not None:
            every = sets
            twins = plan_twins(every, out, fingerprint=prediction_fingerprint(
                settings, params_dir, relaxation=False))  # a source and its twins: one task
            sets, how = part.pinned(
                out / ".parafold-shards" / f"predict-{part.count}.json", every,
                name=lambda fs: fs.name,
                cut=lambda: with_twins([run.sets for run in cut_by_cost(
                    twins.fold, part.count, settings, "gpu" if devices else "cpu")], twins))
            typer.echo(how)
        result = predict_on(devices, sets, out, params_dir=params_dir, settings=settings,
                            trust_pickles=trust_pickles, pin=chosen is not None)
    except KeyboardInterrupt as exc:
        exit_interrupted(_interrupted(exc, f"finished targets in {out} are kept"))
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    outcomes = result.outcomes
    failed = [o for o in outcomes if not o.ok]
    for o in outcomes:
        if o.skipped:
            status = (f"predicted before, relaxed {', '.join(o.relaxed)}" if o.relaxed
                      else "skipped (done)")
        elif o.ok and o.copied_from and Path(o.copied_from).is_absolute():
            status = f"ok (predicted before in {o.copied_from}: copied)"
        elif o.ok and o.copied_from:
            status = f"ok (same features as {o.copied_from}: its prediction copied)"
        else:
            status = "ok" if o.ok else f"FAILED: {o.error}"
        typer.echo(f"{o.name}\t{o.length}\t{status}")
    typer.echo(f"{len(outcomes) - len(failed)}/{len(outcomes)} targets ok")
    _write_predict_results(out, sets, {o.name: o.error for o in failed})
    for where, stats in result.stats.items():
        typer.echo(f"stats ({where}): "
                   f"{ {k: v for k, v in stats.items() if k != 'compile_spans'} }")
    _exit_if_stopped_early(out, [o.stopped_early for o in failed])
    if failed or problems:
        raise typer.Exit(1)


def _predict_preview(sets: list[Any], out: Path, params_dir: Path, settings: Any,
                     platform: str) -> list[str]:
    """`predict --dry-run`: what is done, copied and left, and the modelled GPU stage of what
    is left (`costs.plan_stage`), found without writing anything."""
    from parafold.engine.devices import plan_predict
    from parafold.errors import PipelineError
    from parafold.fold.costs import plan_stage
    from parafold.fold.outputs import is_complete
    from parafold.fold.params import check_params_files

    twins, made = plan_predict(sets, out, params_dir=params_dir, settings=settings)
    done = sum(is_complete(out / fs.name, made) for fs in sets)
    left = [fs for fs in twins.fold if not is_complete(out / fs.name, made)]
    stage = plan_stage(left, settings, platform)
    found = sum(len(copies) for copies in twins.found.values())
    lines = [f"dry run: nothing predicted or written in {out}",
             f"{len(sets)} targets: {done} done, {twins.copies - found} to copy from an "
             f"identical target, {found} from an earlier prediction (--cache-dir), "
             f"{len(left)} to predict",
             f"models {', '.join(settings.model_names)} x {settings.num_seeds} seed(s), "
             f"{settings.num_iterations} iterations each"]
    if left:
        lines += stage.lines(platform)
    try:
        check_params_files(params_dir, settings.model_names)
    except PipelineError as exc:
        lines.append(f"params: {exc} (predict would stop here)")
    return lines


def _write_predict_results(out: Path, sets: list[Any], failures: dict[str, str | None]) -> None:
    """OUT/results.tsv after `predict` (its rows from OUT's folders, with this call's feature
    sets and failures); a table that cannot be written is logged, never fails the command."""
    from parafold.report import write_results_table

    try:
        typer.echo(f"results: {write_results_table(out, feature_sets=sets, failures=failures)}")
    except Exception as exc:  # the predictions are on disk; the table is extra
        from parafold.errors import is_storage_full

        logging.getLogger("parafold.predict").error(
            "could not write the results table in %s: %s", out, exc,
            exc_info=not is_storage_full(exc))


@app.command("relax")
def relax_cmd(
    outs: Annotated[list[Path], typer.Argument(metavar="OUT...", help="Output folders of `predict` or `run`, or target folders.")],
    models_to_relax: Annotated[str, typer.Option("--models-to-relax", help="best (AlphaFold's default) or all.")] = "best",
    cpus: Annotated[int, typer.Option(help="Structures relaxed at once, one core each (0: every core).")] = 0,
    shard: _Shard = None,
) -> None:
    """Amber-relax predicted structures on the CPU, after the GPU stage, as AlphaFold does.

    Resumable: models relaxed before are skipped. Exit 0 only if every target relaxed.
    """
    from parafold.errors import PipelineError
    from parafold.fold.hostwork import host_cores
    from parafold.relax import find_predicted, relax_folders
    from parafold.shards import Shard

    if models_to_relax not in ("best", "all"):
        raise _fail(f"--models-to-relax {models_to_relax!r}: expected best or all")
    if cpus < 0:
        raise _fail(f"--cpus must be >= 0, got {cpus}")
    try:
        part = Shard.parse(shard) if shard is not None else None
    except PipelineError as exc:
        raise _fail(str(exc)) from exc
    folders, unpredicted = find_predicted(outs)
    if not folders:
        raise _fail("no predicted targets (folders with ranking_debug.json) in "
                    + ", ".join(str(o) for o in outs))
    if part is not None:
        folders = part.by_hash(folders, key=lambda f: f.name)
    if unpredicted and (part is None or part.reports_shared):
        typer.echo(f"{len(unpredicted)} target folder(s) not predicted yet, left alone: "
                   + ", ".join(f.name for f in unpredicted[:5])
                   + (" ..." if len(unpredicted) > 5 else ""), err=True)

    def show(result: Any) -> None:
        if result.error is not None:
            typer.echo(f"{result.folder.name}\tFAILED: {result.error}")
        elif result.outcome.relaxed:
            typer.echo(f"{result.folder.name}\trelaxed {', '.join(result.outcome.relaxed)} "
                       f"({result.outcome.seconds:.1f} s)")
        else:
            typer.echo(f"{result.folder.name}\talready relaxed")

    processes = min(len(folders), cpus or host_cores())
    try:
        results = relax_folders(folders, models_to_relax, processes=processes, on_result=show)
    except KeyboardInterrupt as exc:
        from parafold.lifecycle import exit_interrupted

        exit_interrupted(_interrupted(exc, "relaxed models are kept"))
    failed = sum(1 for r in results if r.error is not None)
    typer.echo(f"{len(results) - failed}/{len(results)} targets relaxed")
    _refresh_tables(outs)
    if failed:
        raise typer.Exit(1)


def _refresh_tables(outs: list[Path]) -> None:
    """After `relax`: each OUT's `results.tsv` (and the report of a `run`'s OUT) says which
    targets are relaxed now. Never fails the command: the relaxed files are on disk."""
    from parafold.report import RESULTS_FILE, write_report, write_results_table
    from parafold.report.html import REPORT_FILE

    for out in outs:
        try:
            if (out / REPORT_FILE).is_file():
                typer.echo(f"report: {write_report(out, plots=False)}")
            elif (out / RESULTS_FILE).is_file():
                typer.echo(f"results: {write_results_table(out)}")
        except Exception as exc:
            typer.echo(f"could not update the tables in {out}: {exc}", err=True)


# --- run, status, demo ---

_RUN_HELP = {
    "cpus": "CPU budget for the searches (0: every core, or the whole Ray cluster).",
    "gpus": "GPUs to use: 'all' (default), 'none', or ids like 0,1.",
    "engine": "local (default) or ray.",
    "address": "Ray cluster: auto or HOST:PORT (ray engine; default: a private local Ray).",
    "no_plots": "Do not draw per-target plots (OUT/report.html is still written).",
}


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _run_and_report(settings: object) -> int:
    """Run the pipeline, print the summary, and return the exit code for the shell."""
    from parafold.errors import PipelineError, RunLockedError, StorageFullError
    from parafold.lifecycle import EXIT_STOPPED_EARLY, drain_on_sigusr1
    from parafold.pipeline import RunSettings, run_pipeline

    assert isinstance(settings, RunSettings)
    drain_on_sigusr1()  # Slurm: --signal=B:USR1@SECONDS ends the job's run cleanly
    try:
        summary = run_pipeline(settings)
    except KeyboardInterrupt as exc:
        raise typer.Exit(_interrupted(exc, str(settings.out))) from None
    except RunLockedError as exc:
        raise _fail(str(exc), 3) from exc
    except StorageFullError as exc:
        raise _fail(str(exc), EXIT_STOPPED_EARLY) from exc
    except PipelineError as exc:
        raise _fail(str(exc)) from exc
    for line in summary.lines():
        typer.echo(line)
    return summary.exit_code


@app.command("run")
def run_cmd(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="FASTA file (may be .gz, .bz2, .xz), folder of FASTA files, CSV id,sequence, or A3M files.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: one subfolder per target, the ledger, the lock.")],
    params_dir: Annotated[Path, typer.Option("--params-dir", help="Folder holding params/params_model_N*.npz.")],
    db_dir: Annotated[Path | None, typer.Option("--db-dir", help="AlphaFold database folder.")] = None,
    db_preset: Annotated[str, typer.Option(help="full_dbs or reduced_dbs.")] = "full_dbs",
    uniref90: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    mgnify: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    bfd: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    uniref30: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    small_bfd: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    pdb70: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    pdb_mmcif: Annotated[Path | None, typer.Option(help=_DB_HELP)] = None,
    max_template_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD; newer templates are ignored.")] = None,
    templates: _Templates = True,
    cpus: Annotated[int, typer.Option(help=_RUN_HELP["cpus"])] = 0,
    cpus_per_search: Annotated[int, typer.Option(help="Cores for one protein's searches (0: up to 3).")] = 0,
    gpus: Annotated[str, typer.Option(help=_RUN_HELP["gpus"])] = "all",
    engine: Annotated[str, typer.Option(help=_RUN_HELP["engine"])] = "local",
    address: Annotated[str | None, typer.Option(help=_RUN_HELP["address"])] = None,
    model_preset: Annotated[str, typer.Option(help="monomer or monomer_ptm.")] = "monomer_ptm",
    models: Annotated[str, typer.Option(help="Models to run, e.g. 1,2,3,4,5.")] = "1,2,3,4,5",
    num_recycle: Annotated[int, typer.Option(help="Recycling iterations after the first.")] = 3,
    num_seeds: Annotated[int, typer.Option(help="Seeds per model.")] = 1,
    config: Annotated[str | None, typer.Option("--config", help="full or tiny (default: what the params folder records, else full).")] = None,
    float32: Annotated[bool, typer.Option("--float32", help="Full precision (default bf16 where the model uses it).")] = False,
    tolerance: _Tolerance = 0.0,
    random_seed: _RandomSeed = 0,
    pallas: _Pallas = None,
    compile_cache: _CompileCache = None,
    no_compile_cache: _NoCompileCache = False,
    compile_cache_max_gb: _CompileCacheMaxGb = 20.0,
    no_depth_buckets: _NoDepthBuckets = False,
    save_raw: _SaveRaw = False,
    compile_ahead: _CompileAhead = 1,
    compile_cost: _CompileCost = None,
    merge_max_waste: _MergeMaxWaste = 0.5,
    models_to_relax: _ModelsToRelax = "none",
    max_batch: Annotated[int, typer.Option(help="Most same-shape proteins handed to a GPU worker at once (and per forward pass).")] = 32,
    max_wait: Annotated[float, typer.Option(help="Seconds a GPU worker waits for a same-shape group to fill.")] = 5.0,
    cache_dir: Annotated[Path | None, typer.Option(help="Search cache folder (default OUT/.cache).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before a search tool is killed.")] = 86_400.0,
    progress: Annotated[bool, typer.Option(help="Progress bars on a terminal.")] = True,
    msa_mode: Annotated[str | None, typer.Option("--msa-mode", help=_MSA_MODE_HELP)] = None,
    msa_dir: Annotated[Path | None, typer.Option("--msa-dir", help=_MSA_DIR_HELP)] = None,
    mmseqs_sensitivity: Annotated[float | None, typer.Option(help=_MMSEQS_S_HELP)] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help=_RUN_HELP["no_plots"])] = False,
    shard: _Shard = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what the run would do: targets done, features in OUT or the cache, searches and predictions left. Writes nothing.")] = False,
) -> None:
    """Both stages in one run, overlapped: GPU work starts on the first finished features.

    Resumable: rerun the same command after a crash or kill and finished work is kept.
    Exit code 0 only when every target succeeded and every input record was read (1: some
    failed, or input records were skipped; 2: bad options or an unusable input; 3: another
    live run holds OUT; 75: stopped early with targets left, rerun to resume). With --shard
    each task of a job array needs its own OUT (it holds the task's ledger); a shared
    --cache-dir lets the tasks share searches.
    """
    from parafold.engine.base import parse_gpus
    from parafold.errors import PipelineError
    from parafold.pipeline import RunSettings
    from parafold.search.settings import DEFAULT_MAX_TEMPLATE_DATE, SearchSettings
    from parafold.shards import Shard

    overrides = {"uniref90": uniref90, "mgnify": mgnify, "bfd": bfd, "uniref30": uniref30,
                 "small_bfd": small_bfd, "pdb70": pdb70, "pdb_mmcif": pdb_mmcif}
    try:
        settings = RunSettings(
            input=input_path, out=out, params_dir=params_dir, db_dir=db_dir,
            db_overrides=tuple((k, v) for k, v in overrides.items() if v is not None),
            search=SearchSettings(preset=db_preset, timeout_s=timeout,
                                  max_template_date=max_template_date or DEFAULT_MAX_TEMPLATE_DATE,
                                  use_templates=templates,
                                  **_msa_settings(input_path, msa_mode, msa_dir,
                                                  mmseqs_sensitivity)),
            model=_model_settings(
                params_dir, models=models, config=config, compile_cache=compile_cache,
                no_compile_cache=no_compile_cache, no_depth_buckets=no_depth_buckets,
                compile_cache_max_gb=compile_cache_max_gb,
                tolerance=tolerance, compile_cost=compile_cost, model_preset=model_preset,
                num_recycle=num_recycle, num_seeds=num_seeds, random_seed=random_seed,
                use_pallas=pallas, float32=float32, save_raw=save_raw, max_batch=max_batch,
                compile_ahead=compile_ahead, merge_max_waste=merge_max_waste,
                models_to_relax=models_to_relax),
            cache_dir=cache_dir, cpus=cpus, cpus_per_search=cpus_per_search,
            gpus=parse_gpus(gpus), engine=engine, address=address, max_batch=max_batch,
            max_wait_s=max_wait, progress=progress, plots=not no_plots,
            shard=Shard.parse(shard) if shard is not None else None)
    except PipelineError as exc:  # InputError, or ParamsError from the params folder's record
        raise _fail(str(exc)) from exc
    if dry_run:
        from parafold.pipeline import preview_run

        try:
            preview = preview_run(settings)
        except PipelineError as exc:
            raise _fail(str(exc)) from exc
        for line in preview.lines():
            typer.echo(line)
        raise typer.Exit(0)
    raise typer.Exit(_run_and_report(settings))


@app.command("status")
def status_cmd(
    outs: Annotated[list[Path], typer.Argument(metavar="OUT...", help="A run's output folder; several (the tasks of a `run --shard` array) for a line each and their sum.")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object for scripts: counts by state, rate, time left, failures (with several OUTs: each one's and their sum).")] = False,
) -> None:
    """Counts per state, failures with reasons, throughput and time left (also during a run)."""
    import json

    from parafold.errors import SchedulerError
    from parafold.status import combined_dict, combined_lines, read_status

    try:
        unique = list(dict.fromkeys(out.resolve() for out in outs))  # a folder named twice
        statuses = [read_status(out) for out in (outs if len(unique) == len(outs) else unique)]
    except SchedulerError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        data = statuses[0].as_dict() if len(statuses) == 1 else combined_dict(statuses)
        typer.echo(json.dumps(data, indent=2))
        return
    for line in statuses[0].lines() if len(statuses) == 1 else combined_lines(statuses):
        typer.echo(line)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (databases, weights and results).")] = Path("demo_out"),
    families: Annotated[int, typer.Option(help="Synthetic protein families, one query each.")] = 24,
    cpus: Annotated[int, typer.Option(help=_RUN_HELP["cpus"])] = 0,
    gpus: Annotated[str, typer.Option(help=_RUN_HELP["gpus"])] = "all",
    no_plots: Annotated[bool, typer.Option("--no-plots", help=_RUN_HELP["no_plots"])] = False,
) -> None:
    """The whole pipeline on synthetic databases and random weights, in minutes on a laptop.

    On a GPU it runs the full AlphaFold2 architecture; without one, the tiny config.
    """
    from parafold.demo import prepare_demo
    from parafold.errors import PipelineError

    try:
        settings, note = prepare_demo(out, families=families, cpus=cpus, gpus=gpus,
                                      plots=not no_plots)
    except PipelineError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(note)
    code = _run_and_report(settings)
    typer.echo(f"structures, scores and timings: {out}/<protein>/ ; ledger: {out}/parafold.sqlite"
               f" (see `parafold status {out}`)")
    raise typer.Exit(code)

# --- report ---


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder of a run.")],
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Do not draw missing plots.")] = False,
) -> None:
    """Write OUT/report.html (run summary, worker timeline, target table, plots, 3D views)
    and OUT/results.tsv (a line per target: scores, ranked_0.pdb, state, error)."""
    from parafold.errors import InputError
    from parafold.report import RESULTS_FILE, write_report

    try:
        path = write_report(out, plots=not no_plots)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"report: {path}")
    table = path.with_name(RESULTS_FILE)
    if table.is_file():
        typer.echo(f"results: {table}")


if __name__ == "__main__":
    app()
