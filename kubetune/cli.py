"""The `kubetune` command line: one entry point for people, the operator and the trainer pod."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperOption

from kubetune import contract

if TYPE_CHECKING:
    from kubetune.storage import StorageConfig

app = typer.Typer(
    help="Fine-tune LLMs on Kubernetes, or on this machine with the same trainer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Look at datasets the way the trainer will see them.", no_args_is_help=True)
app.add_typer(data_app, name="data")
artifacts_app = typer.Typer(
    help="The runs a FineTuneJob left in object storage: list them, pull one verified.", no_args_is_help=True
)
app.add_typer(artifacts_app, name="artifacts")

err = Console(stderr=True, soft_wrap=True)


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="FineTuneJob manifests (YAML, any number of documents).")
    ],
) -> None:
    """Check FineTuneJob manifests offline by the API server's rules."""
    from kubetune.manifests import plan_files, validate_files

    errors = validate_files(files) or _harness_problems(files)
    for line in errors:
        err.print(line, markup=False, highlight=False)
    if errors:
        raise typer.Exit(1)
    for line in _deprecations(files):
        err.print(f"warning: {line}", markup=False, highlight=False)
    for source, found in plan_files(files, online=False):
        if not isinstance(found, str) and not found.fits:
            err.print(f"warning: {source}: memory plan: {found.verdict()}", markup=False, highlight=False)
    Console().print(f"{len(files)} file(s) valid", highlight=False)


def _deprecations(files: list[Path]) -> list[str]:
    """Deprecated fields the (valid) manifests use; each is read by its new name."""
    from kubetune.manifests import documents
    from kubetune.validation import parse_job

    return [
        f"{source}: {warning}"
        for path in files
        for source, doc in documents(path)
        for warning in parse_job(doc, source).spec.deprecations()
    ]


def _harness_problems(files: list[Path]) -> list[str]:
    """Unknown lm-evaluation-harness tasks of jobs whose custom tasks are in a local folder."""
    from kubetune.manifests import documents
    from kubetune.validation import parse_job

    if not any("harness" in path.read_text(encoding="utf-8", errors="replace") for path in files):
        return []  # lm-eval's task index takes seconds to build
    from kubetune.trainer.harness import check_local_tasks

    return [
        f"{source}: {problem}"
        for path in files
        for source, doc in documents(path)
        for problem in check_local_tasks(parse_job(doc, source).spec)
    ]


@app.command()
def plan(
    files: Annotated[
        list[Path], typer.Argument(help="FineTuneJob manifests (YAML, any number of documents).")
    ],
    config: Annotated[
        Path | None, typer.Option(help="The model's config.json, for a model not in the built-in table.")
    ] = None,
) -> None:
    """Per-GPU memory of each FineTuneJob, part by part; exits 1 when one does not fit."""
    from kubetune.manifests import plan_files

    out = Console(soft_wrap=True)
    failed = False
    for source, found in plan_files(files, config_path=config):
        if isinstance(found, str):
            err.print(f"{source}: {found}", markup=False, highlight=False)
            failed = True
            continue
        out.print(f"{source}\n{found.table()}\n", markup=False, highlight=False)
        failed = failed or not found.fits
    if failed:
        raise typer.Exit(1)


@app.command()
def crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition (YAML)."""
    from kubetune.crd import render

    typer.echo(render(), nl=False)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="A FineTuneJob manifest.")],
    output: Annotated[
        str | None, typer.Option(help="Write artifacts here instead of spec.output.uri.")
    ] = None,
    nproc_per_node: Annotated[int, typer.Option(help="Processes (one per GPU; gloo on the CPU).")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines taking part (each runs this command).")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the c10d rendezvous.")] = None,
    rdzv_id: Annotated[str, typer.Option(help="Rendezvous id shared by every machine.")] = "kubetune",
) -> None:
    """Run a FineTuneJob on this machine: every stage, with progress and a summary."""
    from kubetune.trainer.distributed import Launch
    from kubetune.trainer.run import run_local

    launch = Launch(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)
    raise typer.Exit(run_local(job, output=output, launch=launch))


@app.command()
def trainer(
    config: Annotated[Path, typer.Option(help="The resolved FineTuneJob the operator mounted.")] = Path(
        contract.CONFIG_PATH
    ),
) -> None:
    """Entry point of the trainer pod: run the job and report to its FineTuneJob."""
    from kubetune.trainer.run import run_in_pod

    raise typer.Exit(run_in_pod(config))


@app.command("operator")
def operator_command(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch this namespace (repeatable).")
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace.")
    ] = False,
    trainer_image: Annotated[
        str | None, typer.Option(envvar="KUBETUNE_TRAINER_IMAGE", help="Default trainer image.")
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics.")] = 8080,
    health_port: Annotated[int, typer.Option(help="Port of /healthz.")] = 8081,
    allowed_image: Annotated[
        list[str] | None,
        typer.Option(
            envvar="KUBETUNE_ALLOWED_IMAGES",
            help="An image pattern spec.image may match (repeatable; * is any text). "
            "Default: the trainer image's repository.",
        ),
    ] = None,
    secrets_namespace: Annotated[
        list[str] | None,
        typer.Option(
            envvar="KUBETUNE_SECRETS_NAMESPACES",
            help="A namespace whose jobs may inject spec.credentials Secrets (repeatable; * for all). "
            "Default: none.",
        ),
    ] = None,
) -> None:
    """Run the FineTuneJob operator."""
    from kubetune.operator.main import run_operator

    if not namespace and not all_namespaces:
        err.print("kubetune operator: give --namespace NS (repeatable) or --all-namespaces")
        raise typer.Exit(2)
    raise typer.Exit(
        run_operator(
            namespaces=namespace or [],
            trainer_image=trainer_image,
            metrics_port=metrics_port,
            health_port=health_port,
            allowed_images=allowed_image or [],
            secrets_namespaces=secrets_namespace or [],
        )
    )


class _FormatsInHelp(TyperCommand):
    """Names the dataset formats in --format's help only when help is shown: the names come from
    kubetune.api, which no other use of the command line needs to import."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from kubetune.api import DatasetFormat

        *first, last = [f.value for f in DatasetFormat]
        for option in self.params:
            if isinstance(option, TyperOption) and option.name == "format":
                option.help = f"{', '.join(first)} or {last}."
        super().format_help(ctx, formatter)


@data_app.command("inspect", cls=_FormatsInHelp)
def data_inspect(
    path: Annotated[str, typer.Argument(help="A dataset: local file, s3:// URI, hf://id or builtin:name.")],
    format: Annotated[str, typer.Option("--format", "-f")] = "auto",
    examples: Annotated[int, typer.Option("--examples", "-n", help="Rendered examples to show.")] = 3,
    model: Annotated[
        str | None, typer.Option(help="Tokenize with this model's tokenizer (id, path or preset).")
    ] = None,
    max_seq_length: Annotated[int, typer.Option(help="Truncation length to report against.")] = 1024,
) -> None:
    """Detected format, counts, token lengths and rendered examples with their loss mask."""
    from kubetune.trainer.data.inspect import run_inspect

    raise typer.Exit(
        run_inspect(
            path, fmt=format, examples=examples, model=model, max_seq_length=max_seq_length, console=Console()
        )
    )


def _storage_config(endpoint: str | None, region: str | None, concurrency: int) -> StorageConfig:
    from kubetune.storage import StorageConfig

    try:
        return StorageConfig(endpoint=endpoint, region=region, max_concurrency=concurrency)
    except ValueError as exc:
        err.print(f"kubetune artifacts: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from exc


_Endpoint = Annotated[
    str | None,
    typer.Option(
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or AWS S3)."
    ),
]
_Region = Annotated[str | None, typer.Option(help="Region (default: the AWS configuration).")]
_Concurrency = Annotated[int, typer.Option(min=1, max=256, help="Requests in flight.")]


@artifacts_app.command("pull")
def artifacts_pull(
    uri: Annotated[
        str, typer.Argument(help="The run: s3://bucket/prefix/<namespace>/<name> or a local path.")
    ],
    dest: Annotated[Path, typer.Argument(help="Directory to download into.")],
    endpoint: _Endpoint = None,
    region: _Region = None,
    concurrency: _Concurrency = 8,
) -> None:
    """Download a finished run, every file checked against its manifest.json (size and SHA-256)."""
    from kubetune.artifacts import run_pull

    config = _storage_config(endpoint, region, concurrency)
    raise typer.Exit(run_pull(uri, dest, config, Console(), err))


@artifacts_app.command("ls")
def artifacts_ls(
    uri: Annotated[str, typer.Argument(help="A prefix: s3://bucket/prefix or a local path.")],
    endpoint: _Endpoint = None,
    region: _Region = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the runs under a prefix: complete or not, job, size, files, date."""
    from kubetune.artifacts import run_ls

    raise typer.Exit(run_ls(uri, _storage_config(endpoint, region, 8), Console(), err, as_json=as_json))
