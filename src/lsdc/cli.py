"""`lsdc` command line: each command parses its arguments and calls one library function.

Heavy imports (torch, sklearn, pydicom) happen inside commands so `lsdc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lsdc.parallel import Executor
    from lsdc.training.engine import CVResult

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
train_app = typer.Typer(no_args_is_help=True, help="Train a model; writes a run folder.")
viz_app = typer.Typer(no_args_is_help=True, help="Pictures (PNG) of data, crops and results.")
app.add_typer(train_app, name="train")
app.add_typer(viz_app, name="viz")
ensemble_app = typer.Typer(no_args_is_help=True, help="Pool several runs' predictions.")
app.add_typer(ensemble_app, name="ensemble")

# The preprocessing commands share these: where the per-study work runs.
ExecutorOption = Annotated[
    str,
    typer.Option(
        help="local (a process pool of --workers) | dask (a Dask cluster: a new local one of "
        "--workers processes, or --scheduler's; pip install 'lsdc\\[dask]')."
    ),
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        help="With --executor dask: an existing cluster's scheduler, e.g. tcp://HOST:8786; its "
        "workers need lsdc and the same data and cache paths."
    ),
]


def _executor(kind: str, scheduler: str | None) -> Executor:
    from lsdc.parallel import Executor

    try:
        return Executor(kind, scheduler)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def preprocess(
    data_dir: Annotated[Path, typer.Argument(help="RSNA-format dataset root.")],
    pipeline: Annotated[str, typer.Option(help="multitask | sequence")],
    cache: Annotated[Path, typer.Option(help="Cache folder (created; resumable).")],
    split: Annotated[str, typer.Option(help="train | test")] = "train",
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 1,
    executor: ExecutorOption = "local",
    scheduler: SchedulerOption = None,
    relevance_run: Annotated[
        Path | None,
        typer.Option(help="Slice-relevance run folder (multitask): predicted slices."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted config overrides, e.g. crop.size=128")
    ] = None,
) -> None:
    """Preprocess a dataset into a per-study cache for one pipeline."""
    from lsdc.fileio import check_output_folder

    where = _executor(executor, scheduler)
    check_output_folder(cache, [("data folder", data_dir), ("relevance run", relevance_run)])
    if pipeline == "multitask":
        from lsdc.preprocess.multitask import preprocess_dataset
    elif pipeline == "sequence":
        if relevance_run is not None:
            raise typer.BadParameter("--relevance-run applies to the multitask pipeline only")
        from lsdc.preprocess.sequence import preprocess_dataset  # type: ignore[no-redef]
    else:
        raise typer.BadParameter(f"unknown pipeline {pipeline!r}: multitask | sequence")
    kwargs = {"relevance_run": relevance_run} if pipeline == "multitask" else {}
    report = preprocess_dataset(
        data_dir,
        cache,
        split=split,
        workers=workers,
        executor=where,
        overrides=overrides or [],
        **kwargs,
    )
    typer.echo(report.summary(cache))
    if report.failed:
        raise typer.Exit(1)


@app.command()
def score(
    labels_csv: Annotated[Path, typer.Argument(help="Labels in train.csv format.")],
    submission_csv: Annotated[Path, typer.Argument(help="Submission CSV to score.")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """The official metric: three weighted log losses, any_severe_spinal and their mean."""
    import json

    from lsdc.metrics import score_files

    try:
        result = score_files(labels_csv, submission_csv)
    except ValueError as exc:  # TableError, MetricError: one clear line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{submission_csv.name} vs {labels_csv.name}")
    table.add_column("term")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.6f}", style="bold" if key == "score" else None)
    Console().print(table)


@app.command("validate-submission")
def validate_submission(
    submission_csv: Annotated[Path, typer.Argument(help="Submission CSV to check.")],
    series_descriptions: Annotated[
        Path, typer.Option(help="Series descriptions CSV naming the studies to expect.")
    ],
) -> None:
    """List every problem of a submission; exit 1 when there is any, print 'valid' otherwise.

    Rows whose probabilities sum to 1 within 1e-6 pass. Rows off by at most 1e-3 (values rounded
    to 4 decimals: 0.9999, 1.0001) are warnings on stderr, not problems: the official scorer
    renormalises every row, so the score does not change. Rows off by more are problems."""
    from lsdc.inference.submission import validate_submission_file

    warnings: list[str] = []
    try:
        problems = validate_submission_file(submission_csv, series_descriptions, warnings)
    except ValueError as exc:  # TableError: one clear line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for warning in warnings[:20]:
        typer.echo(f"warning: {warning}", err=True)
    if len(warnings) > 20:
        typer.echo(f"warning: ... {len(warnings) - 20} more rows like these", err=True)
    if not problems:
        typer.echo(f"valid ({len(warnings)} warnings)" if warnings else "valid")
        return
    for problem in problems:
        typer.echo(problem)
    typer.echo(f"{len(problems)} problems", err=True)
    raise typer.Exit(1)


@app.command("index")
def index_cmd(
    data_dir: Annotated[Path, typer.Argument(help="RSNA-format dataset root.")],
    split: Annotated[str, typer.Option(help="train | test")] = "train",
    out: Annotated[
        Path | None, typer.Option(help="Index CSV (default ./<split>_series_index.csv).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Parallel processes (default min(4, CPUs)).")
    ] = None,
) -> None:
    """Header-only index of every series (geometry, flags); bad files listed, never fatal."""
    from lsdc.fileio import check_output_file, sibling_csv
    from lsdc.io.index import format_summary, index_dataset

    if out is not None:  # the default lies in the current folder
        check_output_file(out, [("data folder", data_dir)])
        check_output_file(sibling_csv(out, "problems"), [("data folder", data_dir)], beside=out)

    try:
        result = index_dataset(data_dir, split=split, out=out, workers=workers)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_summary(result))


@train_app.command("slice-relevance")
def train_slice_relevance_cmd(
    data_dir: Annotated[Path, typer.Argument(help="RSNA-format dataset root (with coordinates).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (models, report, axial ROI).")],
    workers: Annotated[int, typer.Option(help="Parallel processes (features, CV folds).")] = 1,
    feature_cache: Annotated[
        Path | None, typer.Option(help="Feature cache folder (default OUT/features).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted config overrides, e.g. folds=3")
    ] = None,
) -> None:
    """Train and cross-validate the slice-relevance ensemble (multitask step 1)."""
    from lsdc.fileio import check_output_folder
    from lsdc.preprocess.slice_relevance import format_table, train_slice_relevance

    for folder in (out, feature_cache):
        if folder is not None:
            check_output_folder(folder, [("data folder", data_dir)])

    report = train_slice_relevance(
        data_dir, out, workers=workers, overrides=overrides or [], feature_cache=feature_cache
    )
    typer.echo(format_table(report.table))
    typer.echo(f"{report.studies} studies; run folder {report.run_dir}")


@viz_app.command("crops")
def viz_crops(
    cache_dir: Annotated[Path, typer.Argument(help="Multitask cache folder.")],
    study_id: Annotated[int, typer.Argument(help="Study to draw.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")],
) -> None:
    """The three crops of every series type and task of one study, with mapped keypoints."""
    from lsdc.fileio import check_output_file
    from lsdc.preprocess.viz import plot_crops

    check_output_file(out, [("cache", cache_dir)])

    typer.echo(plot_crops(cache_dir, study_id, out))


@train_app.command("sequence")
def train_sequence_cmd(
    cache_dir: Annotated[Path, typer.Argument(help="Sequence cache folder (train split).")],
    out: Annotated[Path, typer.Option(help="Run folder (created; an existing one resumes).")],
    folds: Annotated[int | None, typer.Option(help="Number of study-wise folds.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per fold.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. model.backbone=convnext_atto engine.lr=1e-4"),
    ] = None,
) -> None:
    """Cross-validate the sequence model; writes checkpoints, OOF predictions, score, curves."""
    from lsdc.fileio import check_output_folder
    from lsdc.training.sequence import train_sequence

    check_output_folder(out, [("cache", cache_dir)])

    result = train_sequence(
        cache_dir, out, folds=folds, epochs=epochs, overrides=overrides or [], config_path=config
    )
    _echo_cv(result)


@train_app.command("multitask")
def train_multitask_cmd(
    cache_dir: Annotated[Path, typer.Argument(help="Multitask cache folder (train split).")],
    out: Annotated[Path, typer.Option(help="Run folder (created; an existing one resumes).")],
    folds: Annotated[int | None, typer.Option(help="Number of study-wise folds.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per fold.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dotted overrides, e.g. model.backbone=convnext_atto model.upsample=sr "
            "sr_run=runs/sr data.input.axial_size=96"
        ),
    ] = None,
) -> None:
    """Cross-validate the multitask model (keypoints, two-pass severity); writes checkpoints,
    OOF predictions and keypoints, score, keypoint error, curves."""
    from lsdc.fileio import check_output_folder
    from lsdc.training.multitask import train_multitask

    check_output_folder(out, [("cache", cache_dir)])

    result = train_multitask(
        cache_dir, out, folds=folds, epochs=epochs, overrides=overrides or [], config_path=config
    )
    _echo_cv(result)


def _echo_cv(result: CVResult) -> None:
    """A cross-validation's scores, once (by rank 0 when several processes trained)."""
    from lsdc.training.engine import is_global_zero

    if not is_global_zero():
        return
    terms = ", ".join(f"{k} {v:.4f}" for k, v in result.score.items())
    typer.echo(f"OOF {terms}")
    typer.echo(f"class prior on the same rows: score {result.prior_score['score']:.4f}")
    typer.echo(f"run folder {result.run_dir}")


@viz_app.command("multitask")
def viz_multitask_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Multitask run folder.")],
    cache_dir: Annotated[Path, typer.Argument(help="Multitask cache (train or test).")],
    study_id: Annotated[int, typer.Argument(help="Study to draw.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("multitask.png"),
) -> None:
    """Predicted vs true keypoints on every crop of a study, and the second-pass windows
    before and after upsampling."""
    from lsdc.fileio import check_output_file
    from lsdc.inference.viz import plot_multitask_study

    check_output_file(out, [("run folder", run_dir), ("cache", cache_dir)])

    typer.echo(f"wrote {plot_multitask_study(run_dir, cache_dir, study_id, out)}")


@app.command("synth")
def synth_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the phantom dataset (created).")],
    train_studies: Annotated[int, typer.Option(help="Number of train studies.")] = 20,
    test_studies: Annotated[int, typer.Option(help="Number of test studies.")] = 5,
    size: Annotated[int, typer.Option(help="Sagittal matrix in pixels (axial ~3/4).")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed (same arguments -> same bytes).")] = 0,
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 1,
    coords_fraction: Annotated[
        float, typer.Option(help="Share of train studies with coordinates.")
    ] = 0.7,
    preview: Annotated[
        bool, typer.Option(help="Also write OUT_DIR/preview.png (first study).")
    ] = False,
    axial_flip: Annotated[
        str,
        typer.Option(
            help="Store axial images mirrored, as some scanners do: none | rows (row direction "
            "toward patient right) | cols (column direction toward anterior) | both."
        ),
    ] = "none",
    axial_slices: Annotated[
        int,
        typer.Option(
            help="Every axial series one stack of this many slices (real data: 15-192); "
            "0 = the drawn protocol."
        ),
    ] = 0,
    axial_series: Annotated[
        int, typer.Option(help="Axial series per study: 1 or 2; 0 = drawn (2 in ~15%).")
    ] = 0,
    layout: Annotated[
        str,
        typer.Option(
            help="competition: {split}_images/<study_id>/<series_id>/<instance>.dcm, typed by "
            "the descriptions CSVs. scanner: the same studies (pixels, geometry, UIDs) as a "
            "PACS export under {split}_export/: names varying by study, two studies in one "
            "folder, vendor descriptions and TR/TE/TI, a localiser series, one file written "
            "twice; truth/{split}_export_manifest.csv lists every file. The CSVs and truth/ "
            "are the same in both."
        ),
    ] = "competition",
    dicomdir: Annotated[
        bool,
        typer.Option(
            help="With --layout scanner: make each export a DICOM File-set with "
            "{split}_export/DICOMDIR (pydicom then names the files "
            "PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx; the duplicate stays outside it)."
        ),
    ] = False,
) -> None:
    """Write a phantom RSNA-format dataset with known truth (truth/ holds the test answers),
    in the competition's layout or as a scanner / PACS export (--layout scanner)."""
    from lsdc.synth import generate_dataset

    if preview and layout != "competition":
        # The preview reads the study back through lsdc.io's competition-layout reader.
        raise typer.BadParameter("--preview needs --layout competition")
    out = generate_dataset(
        out_dir,
        train_studies=train_studies,
        test_studies=test_studies,
        size=size,
        seed=seed,
        workers=workers,
        coords_fraction=coords_fraction,
        axial_flip=axial_flip,
        axial_slices=axial_slices,
        axial_series=axial_series,
        layout=layout,
        dicomdir=dicomdir,
    )
    typer.echo(f"wrote {train_studies} train + {test_studies} test studies to {out}")
    if layout == "scanner":
        typer.echo(f"scanner export: files listed in {out / 'truth'}/<split>_export_manifest.csv")
    if preview:
        from lsdc.synth import study_ids
        from lsdc.synth.preview import render_preview

        png = render_preview(out, study_ids(seed, 1)[0], out / "preview.png")
        typer.echo(f"preview {png}")


@viz_app.command("phantom")
def viz_phantom(
    data_dir: Annotated[Path, typer.Argument(help="Phantom dataset root (made by lsdc synth).")],
    study_id: Annotated[int, typer.Argument(help="Study to show.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("phantom.png"),
) -> None:
    """Montage of one phantom study (mid-sagittal T2, parasagittal T1, axials) with true points."""
    from lsdc.fileio import check_output_file
    from lsdc.synth.preview import render_preview

    check_output_file(out, [("data folder", data_dir)])

    typer.echo(f"wrote {render_preview(data_dir, study_id, out)}")


@viz_app.command("sequence")
def viz_sequence(
    cache_dir: Annotated[Path, typer.Argument(help="Sequence cache folder.")],
    study_id: Annotated[int, typer.Argument(help="Study to draw.")],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("sequence.png"),
) -> None:
    """The ordered, cropped slices of every series type of one study, as the model sees them."""
    from lsdc.fileio import check_output_file
    from lsdc.preprocess.sequence import plot_sequence_study

    check_output_file(out, [("cache", cache_dir)])

    typer.echo(f"wrote {plot_sequence_study(cache_dir, study_id, out)}")


@app.command("predict")
def predict_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="With --runs: the RSNA-format data folder. Without: a run folder (expert form, "
            "with CACHE_DIR)."
        ),
    ],
    cache_dir: Annotated[
        Path | None, typer.Argument(help="Expert form: a cache preprocessed like the run's.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")] = Path("submission.csv"),
    runs: Annotated[
        Path | None, typer.Option(help="Runs folder made by `lsdc fit` (from raw DICOM).")
    ] = None,
    split: Annotated[str, typer.Option(help="Which <split>_images folder to predict.")] = "test",
    work: Annotated[
        Path | None, typer.Option(help="Keep the test caches here (default: a temporary folder).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(help="Parallel preprocessing processes, and loader processes for the models."),
    ] = 1,
    executor: ExecutorOption = "local",
    scheduler: SchedulerOption = None,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, with autocast), cpu, cuda or cuda:N.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Studies per model batch.")] = 8,
    series_descriptions: Annotated[
        Path | None,
        typer.Option(help="Expert form: studies that must appear (missing: the class prior)."),
    ] = None,
    tta_flip: Annotated[bool, typer.Option(help="Average with the left/right mirror.")] = True,
) -> None:
    """Predict a submission: `lsdc predict DATA_DIR --runs RUNS --out SUB.csv` runs every stage
    from raw DICOM folders; `lsdc predict RUN CACHE --out SUB.csv` predicts one run on a cache."""
    where = _executor(executor, scheduler)
    if runs is not None:
        from lsdc.pipeline import predict

        if cache_dir is not None:
            raise ValueError("with --runs, give only the data folder (no CACHE_DIR)")
        rep = predict(
            source,
            runs,
            out,
            split=split,
            work_dir=work,
            workers=workers,
            executor=where,
            tta_flip=tta_flip,
            device=device,
            batch_size=batch_size,
            log=typer.echo,
        )
        typer.echo(
            f"{rep.studies} studies -> {rep.path} ("
            + ", ".join(f"{m} saw {n}" for m, n in rep.seen_by.items())
            + ")"
        )
        if rep.warnings:
            typer.echo(f"{len(rep.warnings)} warnings -> {rep.warnings_path}", err=True)
        if rep.prior_only:
            typer.echo(
                f"{len(rep.prior_only)} studies got the weighted prior: "
                + ", ".join(map(str, rep.prior_only[:10])),
                err=True,
            )
        return
    if cache_dir is None:
        raise ValueError("give --runs RUNS_DIR (from raw data), or RUN_DIR CACHE_DIR")
    from lsdc.fileio import check_output_file
    from lsdc.inference.predictor import predict_submission
    from lsdc.pipeline import predict_outputs

    sub, _, coordinates = predict_outputs(out)
    inputs = [
        ("run folder", source),
        ("cache", cache_dir),
        ("series descriptions table", series_descriptions),
    ]
    check_output_file(sub, inputs)
    check_output_file(coordinates, inputs, beside=sub)
    report = predict_submission(
        source,
        cache_dir,
        out,
        series_descriptions=series_descriptions,
        tta_flip=tta_flip,
        device=device,
        batch_size=batch_size,
        coordinates_out=coordinates,
    )
    typer.echo(f"{report.predicted} studies predicted -> {report.path}")
    if report.coordinates is not None:
        typer.echo(f"predicted keypoints -> {report.coordinates}")
    if report.filled:
        typer.echo(
            f"{len(report.filled)} studies not in the cache got the class prior: "
            + ", ".join(map(str, report.filled)),
            err=True,
        )


@app.command("grade")
def grade_cmd(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Folders, files or DICOMDIRs: a scanner or PACS export, any layout."),
    ],
    runs: Annotated[Path, typer.Option(help="Runs folder made by `lsdc fit`.")],
    out: Annotated[Path, typer.Option(help="Folder for one sub-folder per study (created).")],
    work: Annotated[
        Path | None, typer.Option(help="Keep the caches here (default: a temporary folder).")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Parallel processes to read headers and preprocess.")
    ] = 1,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present, with autocast), cpu, cuda or cuda:N.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Studies per model batch.")] = 8,
    submission: Annotated[
        Path | None, typer.Option(help="Also write the competition's submission CSV here.")
    ] = None,
    tta_flip: Annotated[bool, typer.Option(help="Average with the left/right mirror.")] = True,
) -> None:
    """Grade any lumbar MRI study: find the DICOM studies under INPUTS, identify their Sagittal
    T1, Sagittal T2/STIR and Axial T2 series from the headers, and write per study
    OUT/<StudyInstanceUID>/grades.json, report.html and sr.dcm, and OUT/grades.csv."""
    from lsdc.grade.grading import grade

    rep = grade(
        inputs,
        runs,
        out,
        work_dir=work,
        workers=workers,
        device=device,
        batch_size=batch_size,
        tta_flip=tta_flip,
        submission=submission,
        log=typer.echo,
    )
    for g in rep.graded:
        used = ", ".join(
            f"{s.series_type} = {s.description or s.series_instance_uid}"
            for s in g.series
            if s.used
        )
        typer.echo(f"{g.study_instance_uid} (study {g.study_id}): {used}")
    typer.echo(f"{len(rep.graded)} studies graded -> {rep.out_dir} (summary: {rep.summary})")
    if rep.submission is not None:
        typer.echo(f"submission -> {rep.submission}")
    for uid, why in rep.failed.items():
        typer.echo(f"not graded: {uid}: {why}", err=True)
    if rep.failed and not rep.graded:
        raise typer.Exit(1)


@app.command("fit")
def fit_cmd(
    data_dir: Annotated[Path, typer.Argument(help="RSNA-format data folder (train split).")],
    out: Annotated[Path, typer.Option(help="Runs folder to write (resumed when it exists).")],
    preset: Annotated[
        str, typer.Option(help="demo | tiny | cpu | gpu: model sizes, epochs.")
    ] = "cpu",
    models: Annotated[
        str,
        typer.Option(
            help="Comma-separated families (multitask, sequence); default the preset's: "
            "multitask for demo, both for the others."
        ),
    ] = "",
    work: Annotated[
        Path | None, typer.Option(help="Training caches here (default RUNS/cache).")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Parallel processes: preprocessing; on CPU, folds side by side.")
    ] = 1,
    executor: ExecutorOption = "local",
    scheduler: SchedulerOption = None,
    rehearse: Annotated[
        bool,
        typer.Option(
            help="Run the preset's code paths (loader workers, mixed precision, several "
            "processes) on the CPU at a tiny size, then predict the test split: try a "
            "configuration before renting a GPU."
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="STAGE.key=value, e.g. multitask.engine.epochs=3 sequence_cache.size=96"
        ),
    ] = None,
) -> None:
    """Train every stage (slice relevance, caches, super-resolution, models on all folds, the
    ensemble) into a runs folder that `lsdc predict DATA --runs` uses. Library messages go to
    RUNS/fit.log; timings and scores to RUNS/fit.json."""
    from lsdc import pipeline
    from lsdc.training.engine import is_global_zero

    where = _executor(executor, scheduler)
    if rehearse:
        if work is not None or executor != "local":
            raise ValueError("--rehearse runs on this machine, in RUNS: no --work or --executor")
        pipeline.rehearse(
            data_dir,
            out,
            preset=preset,
            models=[m for m in models.split(",") if m.strip()] or None,
            overrides=overrides or [],
            workers=max(workers, 2),
            log=typer.echo,
        )
        return
    rep = pipeline.fit(
        data_dir,
        out,
        preset=preset,
        models=[m for m in models.split(",") if m.strip()] or None,
        overrides=overrides or [],
        work_dir=work,
        workers=workers,
        executor=where,
        log=typer.echo,
    )
    if is_global_zero():  # not again from the processes of a stage on several devices
        typer.echo(f"runs folder {rep.runs_dir} (fit.json, plan.json, ensemble.json)")


@ensemble_app.command("fit")
def ensemble_fit_cmd(
    runs: Annotated[list[Path], typer.Option(help="Run folders to pool (repeat the option).")],
    out: Annotated[Path, typer.Option(help="Ensemble JSON to write.")],
    folds: Annotated[int, typer.Option(help="The ensemble's own CV folds.")] = 5,
) -> None:
    """Fit per-condition weights and a calibration on the runs' out-of-fold predictions; the
    ensemble's OOF score is cross-fitted, never measured on the rows it was fitted on."""
    import json

    from lsdc.fileio import check_output_file
    from lsdc.inference.ensemble import fit_ensemble, save_ensemble

    check_output_file(out, [("run folder", r) for r in runs])
    ens, rep = fit_ensemble({r.name: r for r in runs}, folds=folds)
    save_ensemble(ens, out, rep.to_dict())
    typer.echo(json.dumps(rep.to_dict(), indent=1))
    typer.echo(f"wrote {out}")


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder for everything the demo makes.")] = Path(
        "demo-output"
    ),
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Dotted overrides, e.g. train_studies=200 size=192 "
            "'fit=\\[multitask.engine.epochs=16]' (lsdc fit overrides)"
        ),
    ] = None,
) -> None:
    """The whole product on a phantom: synth, `lsdc fit --preset demo`, `lsdc predict` on the
    held-out studies, every model and the ensemble scored against the truth beside the class
    prior, uniform and the oracle; OUT_DIR/report/index.html shows it all."""
    from lsdc.config import load_config
    from lsdc.demo import DemoConfig, run_demo

    run_demo(out_dir, load_config(DemoConfig, None, overrides or []), log=typer.echo)


@train_app.command("sr")
def train_sr_cmd(
    cache_dir: Annotated[Path, typer.Argument(help="Multitask cache folder.")],
    out: Annotated[Path, typer.Option(help="Run folder to write (weights, report, examples).")],
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. scale=4 channels=16 patch=64"),
    ] = None,
) -> None:
    """Train the super-resolution network self-supervised on a multitask cache (degrade, then
    restore); reports held-out PSNR/SSIM against bicubic upsampling."""
    from lsdc.fileio import check_output_folder
    from lsdc.training.superres import train_sr

    check_output_folder(out, [("cache", cache_dir)])

    extra = [f"steps={steps}"] if steps is not None else []
    report = train_sr(
        cache_dir, out, overrides=[*(overrides or []), *extra], config_path=config, progress=True
    )
    typer.echo(
        f"held-out {report.images_val} images: PSNR SR {report.psnr_sr:.2f} dB vs bicubic "
        f"{report.psnr_bicubic:.2f} dB; SSIM SR {report.ssim_sr:.4f} vs bicubic "
        f"{report.ssim_bicubic:.4f}"
    )
    typer.echo(f"run folder {report.run_dir}")


# -- commands end here (append new commands above this line) --


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the full traceback of an error (anywhere on the line; or LSDC_DEBUG=1).",
        ),
    ] = False,
) -> None:
    """Expected errors (bad input, missing files, wrong settings) print one line naming what
    and where, and exit with status 1; `--debug` shows the traceback instead. Ctrl-C prints
    one line and exits with status 130."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What bad input or settings raise, as opposed to a bug in lsdc.

    Evaluated whenever the app ends with an exception, SystemExit included (every command's
    normal end), so it must import nothing heavy: the backbones module imports torch (about
    4 s and 0.9 GB of peak memory here), which `lsdc index` or `lsdc synth` never need. An
    error it defines can only have been raised once it is imported."""
    import sys

    from omegaconf.errors import OmegaConfBaseException

    from lsdc.io.dicom import SeriesReadError, SliceReadError
    from lsdc.io.study import StudyReadError
    from lsdc.parallel import MissingOptionalDependency
    from lsdc.preprocess.cache import CacheMismatchError

    backbones = sys.modules.get("lsdc.models.backbones")
    torch_errors = (backbones.PretrainedWeightsUnavailable,) if backbones is not None else ()
    return (
        ValueError,
        KeyError,
        OSError,
        OmegaConfBaseException,
        CacheMismatchError,
        MissingOptionalDependency,
        *torch_errors,
        StudyReadError,
        SeriesReadError,
        SliceReadError,
    )


def error_line(exc: BaseException) -> str:
    """One line for the user: the message's first line (KeyError's without its quotes), with
    the exception's kind."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return f"error: {first or type(exc).__name__} ({type(exc).__name__})"


def _command_words(args: list[str]) -> str:
    """The command that `args` runs, as typed: "fit", "train multitask" ("" when none)."""
    words: list[str] = []
    group = typer.main.get_command(app)
    for arg in args:
        commands = getattr(group, "commands", {})  # a group's; a command has none
        if arg not in commands:
            break
        words.append(arg)
        group = commands[arg]
    return " ".join(words)


def main(argv: list[str] | None = None) -> None:
    """The `lsdc` entry point: the app, with expected errors turned into one line, and Ctrl-C
    into one line and exit status 130."""
    import os
    import sys

    from lsdc.interrupt import EXIT_STATUS, Interrupted, sigint_raises

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LSDC_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]  # accepted anywhere, not only before the command
    try:
        with sigint_raises():
            app(args=args, prog_name="lsdc")
    except Interrupted as exc:
        if debug:
            raise
        # Once, by rank 0, when Ctrl-C reached every process of a stage on several devices
        # (only a command that trained has imported the engine).
        engine = sys.modules.get("lsdc.training.engine")
        if engine is None or engine.is_global_zero():
            typer.echo(f"lsdc {_command_words(args)}: {exc}", err=True)
        sys.exit(EXIT_STATUS)
    except _expected_errors() as exc:
        if debug:
            raise
        typer.echo(error_line(exc), err=True)
        typer.echo("(run again with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
