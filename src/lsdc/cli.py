"""`lsdc` command line: each command parses its arguments and calls one library function.

Heavy imports (torch, sklearn, pydicom) happen inside commands so `lsdc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
train_app = typer.Typer(no_args_is_help=True, help="Train a model; writes a run folder.")
viz_app = typer.Typer(no_args_is_help=True, help="Pictures (PNG) of data, crops and results.")
app.add_typer(train_app, name="train")
app.add_typer(viz_app, name="viz")


@app.command()
def preprocess(
    data_dir: Annotated[Path, typer.Argument(help="RSNA-format dataset root.")],
    pipeline: Annotated[str, typer.Option(help="multitask | sequence")],
    cache: Annotated[Path, typer.Option(help="Cache folder (created; resumable).")],
    split: Annotated[str, typer.Option(help="train | test")] = "train",
    workers: Annotated[int, typer.Option(help="Parallel processes.")] = 1,
    relevance_run: Annotated[
        Path | None,
        typer.Option(help="Slice-relevance run folder (multitask): predicted slices."),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted config overrides, e.g. crop.size=128")
    ] = None,
) -> None:
    """Preprocess a dataset into a per-study cache for one pipeline."""
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
        data_dir, cache, split=split, workers=workers, overrides=overrides or [], **kwargs
    )
    typer.echo(
        f"{len(report.written)} written, {len(report.skipped)} already cached, "
        f"{len(report.failed)} failed (see {cache / 'errors.jsonl'})"
    )
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
    """List every problem of a submission; exit 1 when there is any, print 'valid' otherwise."""
    from lsdc.inference.submission import validate_submission_file

    try:
        problems = validate_submission_file(submission_csv, series_descriptions)
    except ValueError as exc:  # TableError: one clear line, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not problems:
        typer.echo("valid")
        return
    for problem in problems:
        typer.echo(problem)
    typer.echo(f"{len(problems)} problems", err=True)
    raise typer.Exit(1)


# -- commands end here (append new commands above this line) --


def main() -> None:
    app()


if __name__ == "__main__":
    main()
