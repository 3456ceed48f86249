"""The ``unipack`` command line: a thin front end over the Python API.

User errors (``UnipackError``) become one line on stderr and exit code 1; usage errors exit 2
(click's convention). Data goes to stdout, progress and diagnostics to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from unipack.api import Bundle
from unipack.api import open as open_bundle
from unipack.errors import OptionsError, UnipackError
from unipack.format.atomic import atomic_write, check_not_input, check_writable
from unipack.options import MergeOptions
from unipack.pack.executors import EXECUTORS
from unipack.pack.merge import MergeResult, merge
from unipack.render.console import ProgressBars, format_bytes, info_table, merge_summary
from unipack.render.documents import merge_document
from unipack.sources.checkpoint import resolve_names
from unipack.sources.url import as_input, is_url
from unipack.version import __version__

# Pipes and CI logs have no width; rich would fall back to 80 columns and cut member names.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out_console = Console(width=None if sys.stdout.isatty() else 160)


def merge_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per ``MergeOptions`` field, from the field's own metadata."""
    for f in reversed(dataclasses.fields(MergeOptions)):
        if "flag" not in f.metadata:  # set by the Python API or by merge --size only (tensor_bounds)
            continue
        meta = dict(f.metadata)
        flag, help_text = meta.pop("flag"), meta.pop("help")
        if "choices" in meta:
            meta["type"] = click.Choice(meta.pop("choices"))
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta.get("multiple"):
            default = ()
        show = default not in (None, (), False)
        command = click.option(flag, f.name, default=default, show_default=show, help=help_text, **meta)(command)
    return command


class InternalError(click.ClickException):
    exit_code = 3


#: What Ctrl-C prints (exit code 130, the shell's convention for SIGINT).
INTERRUPTED = "interrupted: nothing written (outputs are written atomically: any existing file is untouched)"

#: Signals that end a command like Ctrl-C does (temp files removed, nothing renamed into place):
#: SIGTERM (kill, systemd, docker stop, CI timeouts) and SIGHUP (the terminal went away).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the main thread is, like Ctrl-C's KeyboardInterrupt (which
    it subclasses, so that every clean-up that runs for Ctrl-C runs for it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        # 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP), what a shell reports for a
        # process that signal ended: supervisors and scripts tell "terminated" from "Ctrl-C" (130).
        return 128 + self.signum

    @property
    def message(self) -> str:
        return INTERRUPTED.replace("interrupted", f"terminated by {signal.Signals(self.signum).name}", 1)


def _terminate(signum: int, frame: object) -> None:
    # A second signal must not cut the clean-up of the first short.
    for sig in TERMINATING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def handle_termination_signals() -> None:
    """Turn SIGTERM and SIGHUP into ``Terminated`` (by default they kill the process at once,
    leaving its temp and spool files behind). A signal the parent set to be ignored (``nohup``)
    stays ignored."""
    for sig in TERMINATING_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminate)


#: API arguments that the API's messages name, as the command line spells them: a CLI user is
#: told which flag to pass, never a Python keyword.
CLI_SPELLINGS = (("--force (force=True)", "--force"), ("force=True", "--force"))


def cli_message(message: str) -> str:
    """An API error message with the API's argument names replaced by the CLI's flags."""
    for api, flag in CLI_SPELLINGS:
        message = message.replace(api, flag)
    return message


def print_json(doc: object) -> None:
    """A ``--json`` result: one JSON document on stdout."""
    click.echo(json.dumps(doc, indent=2))


class UnipackGroup(click.Group):
    """Turns unipack's own errors into click errors: one line, ``Error: ...``, exit 1; Ctrl-C
    into one line and exit 130; SIGTERM and SIGHUP (see ``handle_termination_signals``) into one
    line and exit 128 + the signal's number."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as exc:
            # Every output is written to a temp file and renamed into place only when complete,
            # and temp files are removed on the way out: an interrupted command wrote nothing.
            if isinstance(exc, Terminated):
                click.echo(exc.message, err=True)
                ctx.exit(exc.exit_code)
            click.echo(INTERRUPTED, err=True)
            ctx.exit(130)
        except UnipackError as exc:
            raise click.ClickException(cli_message(str(exc))) from None
        except MemoryError:
            raise click.ClickException("out of memory; try fewer or smaller inputs, or more RAM") from None
        except Exception as exc:  # a bug in unipack, not the user's fault: say so in one line
            if os.environ.get("UNIPACK_DEBUG"):
                raise
            raise InternalError(
                f"internal error: {type(exc).__name__}: {exc} (a bug: please report "
                f"it; UNIPACK_DEBUG=1 shows the traceback)"
            ) from None


@click.group(cls=UnipackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unipack")
def cli() -> None:
    """Pack many fine-tunes of one base model into one compact bundle, and get any one back."""


class InputType(click.ParamType):
    """An input: a local path (a ``Path``), or a URL (kept as typed: ``s3://bucket/ft1.safetensors``,
    read through fsspec, see ``sources.remote``)."""

    name = "path or URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path) or (isinstance(value, str) and is_url(value)):
            return value
        return Path(value)


INPUT = InputType()


def expanded(inputs: tuple[Path | str, ...]) -> list[Path | str]:
    """The inputs with each URL pattern (``s3://bucket/run*/model.safetensors``) replaced by the
    URLs it matches (sorted), as a shell expands a local pattern."""
    out: list[Path | str] = []
    for item in inputs:
        if isinstance(item, str):
            from unipack.sources.remote import expand

            out.extend(expand([item]))
        else:
            out.append(item)
    return out


@cli.command("merge", short_help="Pack same-architecture checkpoints into one bundle.")
@click.argument("inputs", nargs=-1, required=True, type=INPUT)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle to write (.upk).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the merge summary as JSON (on stdout).")
@click.option(
    "--eval",
    "eval_spec",
    metavar="SPEC",
    help="Score every member with evaluate(state_dict, "
    "member_name) -> dict[str, float] (path/to/eval.py[:function] or module:function) and record "
    "original and reconstructed scores in the bundle.",
)
@click.option(
    "--max-drop",
    type=float,
    help="With --eval: tighten --max-error until no member's metric drops "
    "by more than this (in the metric's units, e.g. 0.5 accuracy points).",
)
@click.option("--metric", help="With --eval: which metric of the eval's dict (default: its first key).")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Processes that fit tensors side by side (default: every core, as far as free memory holds "
    "one tensor per worker, for inputs of 64 MiB and more read from safetensors; 1 otherwise). The "
    "bundle is byte-identical whatever the number.",
)
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="Where the per-tensor jobs run: local (--jobs processes on this machine) or dask (the Dask "
    "cluster of --scheduler, whose workers read the inputs at the same paths: shared storage; needs "
    "pip install 'unipack[dask]'). The bundle is byte-identical whatever runs them.",
)
@click.option(
    "--scheduler",
    metavar="ADDR",
    help="With --executor dask: the scheduler's address (tcp://host:port, as `dask scheduler` prints it) "
    "or its --scheduler-file.",
)
@click.option(
    "--size",
    "size_target",
    metavar="SIZE",
    callback=lambda ctx, param, value: _size_option(value, "--size"),
    help="Write the most faithful bundle that fits SIZE (e.g. 200MB, 1.5GiB): the error "
    "bounds are scaled together until the file is within 1% below SIZE (one merge per try).",
)
@click.option(
    "--bits",
    type=float,
    help="As --size, with SIZE = BITS per parameter of the inputs (every tensor of every member).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="The base model the members were fine-tuned from (a .safetensors file or model folder): "
    "quantized deltas may then be taken from its tensors (matched by name, across one common prefix, "
    "shape and dtype), which the bundle references by sha256 instead of storing a mean; "
    "--max-delta-error is then relative to ||W - base||. extract/add/export need the same base.",
)
@click.option(
    "--name",
    "name_pairs",
    multiple=True,
    metavar="SOURCE=NAME",
    help="Call the member from input "
    "SOURCE (its path as given, or its default name: the file name without suffix, or the folder "
    "name) NAME. Repeatable.",
)
@merge_options
def merge_cmd(
    inputs: tuple[Path | str, ...],
    output: Path,
    force: bool,
    quiet: bool,
    as_json: bool,
    eval_spec: str | None,
    max_drop: float | None,
    metric: str | None,
    jobs: int | None,
    executor: str,
    scheduler: str | None,
    size_target: int | None,
    bits: float | None,
    base: Path | None,
    name_pairs: tuple[str, ...],
    **fields: Any,
) -> None:
    """Merge same-architecture checkpoints (.safetensors, .bin/.pt, Hugging Face folders) into one bundle.

    INPUTS are local paths or URLs (s3://bucket/ft1.safetensors, gs://bucket/ft2/ for a model folder,
    s3://bucket/run*/model.safetensors as a pattern; any protocol fsspec knows: pip install
    'unipack[remote]'), read by byte range.

    The merge summary is the result: on stdout (--json: as JSON); progress goes to stderr."""
    options = MergeOptions(**{k: v for k, v in fields.items()})
    if (max_drop is not None or metric is not None) and eval_spec is None:
        raise click.UsageError("--max-drop and --metric need --eval SPEC (the function that scores a member)")
    if size_target is not None and bits is not None:
        raise click.UsageError("give --size or --bits, not both")
    if scheduler is not None and executor != "dask":
        raise click.UsageError("--scheduler is for --executor dask (add --executor dask)")
    if executor == "dask" and scheduler is None:
        raise click.UsageError("--executor dask needs --scheduler ADDR (tcp://host:port, or a scheduler file)")
    if executor == "dask" and jobs is not None:
        raise click.UsageError("--jobs is for --executor local; a Dask cluster runs one job per worker thread")
    where: dict[str, Any] = {"jobs": jobs, "executor": executor, "scheduler": scheduler, "base": base}
    if (size_target is not None or bits is not None) and eval_spec is not None:
        raise click.UsageError("--size/--bits cannot be combined with --eval yet: pick the bundle by size or by drop")
    given = expanded(inputs)
    names = resolve_names([as_input(i) for i in given], name_pairs) if name_pairs else None
    bars = None if quiet else ProgressBars(err_console)
    try:
        if size_target is not None or bits is not None:
            from unipack.pack.size_target import bits_target, merge_to_size

            target = size_target if size_target is not None else bits_target(list(given), bits or 0.0, names)
            tries: list[int] = []

            def tried(a: Any) -> None:
                tries.append(a.file_bytes)
                err_console.print(
                    f"size search, merge {len(tries)}: {a.rule_text} -> {format_bytes(a.file_bytes)} "
                    f"(target {format_bytes(target)})"
                )

            result: MergeResult = merge_to_size(
                list(given),
                output,
                target,
                options=options,
                names=names,
                force=force,
                progress=bars,
                on_attempt=None if quiet else tried,
                **where,
            )
        elif eval_spec is None:
            result = merge(list(given), output, options=options, names=names, force=force, progress=bars, **where)
        else:
            from unipack.pack.max_drop import merge_with_eval
            from unipack.usercode import load_eval

            result = merge_with_eval(
                list(given),
                output,
                load_eval(eval_spec),
                max_drop=max_drop,
                metric=metric,
                options=options,
                names=names,
                force=force,
                progress=bars,
                **where,
                on_attempt=lambda a: err_console.print(
                    f"{a.rule_text}: {format_bytes(a.file_bytes)}, largest drop {a.worst_drop:.3g} ({a.worst_member})"
                ),
            )
    finally:
        if bars:
            bars.stop()
    if as_json:
        print_json(merge_document(result))
    else:
        out_console.print(merge_summary(result))
    evaluation = result.manifest.stats.get("evaluation")
    if isinstance(evaluation, dict) and evaluation.get("met") is False:
        # The bundle is kept (lossless at budget 0), but a script must not mistake it for success.
        raise UnipackError(
            f"--max-drop {evaluation.get('max_drop')} not met even at --max-error 0 (largest drop "
            f"{evaluation.get('worst_drop'):.3g}, {evaluation.get('worst_member')}): is the eval "
            f"deterministic? The bundle was written to {result.path}"
        )


def _shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--max-shard-size`` as bytes; a malformed size is a usage error (exit 2), like a bad choice."""
    return _size_option(value, "--max-shard-size")


def _size_option(value: str | None, what: str) -> int | None:
    from unipack.export.hf_folder import parse_size

    try:
        return None if value is None else parse_size(value, what)
    except OptionsError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


@cli.command("extract", short_help="Get a member back: .safetensors, HF or PEFT folder.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--member", "-m", help="Member to extract.")
@click.option("--all", "all_members", is_flag=True, help="Extract every member into the -o directory.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output .safetensors file (default <member>.safetensors), folder with --format hf or peft "
    "(default <member>), or directory with --all (default .). Without -o nothing that exists is "
    "replaced, even with --force: the current directory may hold the originals.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "hf", "peft"]),
    default="safetensors",
    show_default=True,
    help="safetensors: one file per member. hf: a Hugging Face model folder (config files + weights) "
    "that transformers' from_pretrained loads. peft (LoRA bundles): a PEFT adapter folder "
    "(adapter_config.json + adapter_model.safetensors) that PeftModel.from_pretrained loads.",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="The base model. For a bundle merged with --base: the base it references (a .safetensors "
    "file or model folder, checked against its recorded sha256s), which its members are rebuilt "
    "from. With --format hf, for a LoRA bundle: the base model's Hugging Face folder (config.json + "
    "safetensors weights); writes that folder with the adapter folded in (W + s·B·A, its "
    "modules_to_save tensors in place), which from_pretrained loads without peft.",
)
@click.option(
    "--max-shard-size",
    metavar="SIZE",
    callback=_shard_size,
    help="With --format hf: split weights into shards of at most SIZE (default 5GB; 500MB, 5GiB or "
    "bytes; GB = 10^9, GiB = 2^30), with model.safetensors.index.json.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite the existing -o output (with --format hf: replace the folder as a whole, once the new one "
    "is complete).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="The member bit for bit, from the bundle's lossless tier (merge --lossless); each tensor is "
    "checked against the sha256 of its original. --format safetensors only.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written (paths, worst errors) as JSON.")
def extract_cmd(
    bundle: Path,
    member: str | None,
    all_members: bool,
    output: Path | None,
    fmt: str,
    base: Path | None,
    max_shard_size: int | None,
    force: bool,
    exact: bool,
    as_json: bool,
) -> None:
    """Materialise a member (or --all) as .safetensors, as a Hugging Face model folder (--format hf; a
    LoRA adapter with --base BASE_DIR: folded into its base model), or as a PEFT adapter folder
    (--format peft).

    The paths written are the result (stdout; --json: with each member's worst error)."""
    if all_members == (member is not None):
        raise click.UsageError("give exactly one of --member NAME or --all")
    if max_shard_size is not None and fmt != "hf":
        raise click.UsageError("--max-shard-size applies to --format hf only")
    if exact and fmt != "safetensors":
        raise click.UsageError("--exact applies to --format safetensors only")
    with open_bundle(bundle) as b:
        if base is not None and b.is_lora and fmt != "hf":
            raise click.UsageError("--base applies to --format hf only (a LoRA adapter folded into its base model)")
        if base is not None and not b.is_lora:  # the base model the bundle references: every format
            b.attach_base(base)
            base = None
        names = list(b.members) if all_members else [str(member)]
        folder = output or Path(".")
        suffix = ".safetensors" if fmt == "safetensors" else ""
        targets = [folder / f"{name}{suffix}" for name in names] if all_members else [output or Path(names[0] + suffix)]
        worst = max(b.member(names[0]).errors, default=0.0)  # an unknown member: its error first
        if output is None:
            refuse_taken_defaults(targets, b, "-o FILE" if fmt == "safetensors" and not all_members else "-o DIR")
        if exact:
            missing = [n for n in names if b.member(n).exact is None]
            if missing:
                raise click.ClickException(
                    f"{bundle}: member {missing[0]!r} has no lossless tier (only members merged with "
                    f"--lossless have one); extract it without --exact for the lossy member"
                )
            worst = 0.0
        kind = "exact" if worst == 0 else "lossy"
        if fmt == "peft":
            peft = (
                b.extract_peft_all(folder, force=force)
                if all_members
                else [b.extract_peft(names[0], targets[0], force=force)]
            )
            written = [extract_record(b, e.member, e.directory, files=list(e.files)) for e in peft]
            done = f"as a PEFT adapter folder: worst relative error of any module's update {worst:.3g} ({kind})"
        elif fmt == "hf":
            from unipack.export.hf_folder import DEFAULT_MAX_SHARD_SIZE

            limit = max_shard_size or DEFAULT_MAX_SHARD_SIZE
            hf = (
                b.extract_hf_all(folder, base=base, max_shard_size=limit, force=force)
                if all_members
                else [b.extract_hf(names[0], targets[0], base=base, max_shard_size=limit, force=force)]
            )
            for e in hf:
                if e.note:
                    click.echo(f"Warning: {e.note}", err=True)
            written = [
                extract_record(
                    b,
                    e.member,
                    e.directory,
                    files=list(e.files),
                    sharded=e.sharded,
                    has_config=e.has_config,
                    **({"base": str(e.base)} if e.base is not None else {}),
                )
                for e in hf
            ]
            files, shards = len(hf[0].files), sum(f.endswith(".safetensors") for f in hf[0].files)
            counts = f"{files} file{'s' if files != 1 else ''} ({shards} weight shard{'s' if shards != 1 else ''})"
            done = (
                f"folded into {base} as a Hugging Face folder: {counts}, worst relative error {worst:.3g} of "
                f"any module's update ({kind})"
                if base is not None
                else f"as a Hugging Face folder: {counts}, worst relative error {worst:.3g} on any tensor ({kind})"
            )
        else:
            paths = (
                b.extract_all(folder, force=force, exact=exact)
                if all_members
                else [b.extract(names[0], targets[0], force=force, exact=exact)]
            )
            bit_exact = {"worst_error": 0.0, "exact": True} if exact else {}
            written = [extract_record(b, name, path, **bit_exact) for name, path in zip(names, paths)]
            done = (
                "bit for bit (every tensor matches its original's sha256)"
                if exact
                else f"worst relative error {worst:.3g} on any tensor ({kind})"
            )
        if as_json:
            print_json({"bundle": str(bundle), "format": fmt, "extracted": written})
        else:
            for w in written:
                click.echo(w["path"])
        if not all_members:
            err_console.print(f"extracted [bold]{names[0]}[/]{':' if fmt == 'safetensors' else ''} {done}")


def refuse_taken_defaults(targets: list[Path], bundle: Bundle, hint: str) -> None:
    """Without -o, extract writes only where nothing is, whatever --force says: the current
    directory is often the folder of the merge's inputs, and a member's default output has its
    original's name, so replacing it could put a lossy copy in place of the original."""
    taken = [t for t in targets if os.path.lexists(t)]
    if not taken:
        return
    first = taken[0]
    where = f"{first} (and {len(taken) - 1} more)" if len(taken) > 1 else str(first)
    origin = next((m.name for m in bundle.manifest.members if m.source == first.name), None)
    why = f", and may be the original that member {origin} was merged from" if origin else ""
    raise UnipackError(
        f"{where}: already exists{why}; without -o, extract never replaces anything: give {hint} "
        f"(with --force to replace an existing one)"
    )


def extract_record(bundle: Bundle, member: str, path: Path, **extra: Any) -> dict[str, Any]:
    """One member in ``extract --json``: where it went and how faithful it is."""
    worst = max(bundle.member(member).errors, default=0.0)
    return {"member": member, "path": str(path), "worst_error": worst, "exact": worst == 0, **extra}


@cli.command("info", short_help="Bytes by part, ratio, worst errors and ranks of a bundle.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--tensors", is_flag=True, help="Also list every tensor's storage, scheme and rank.")
def info_cmd(bundle: Path, as_json: bool, tensors: bool) -> None:
    """Members, storage by scheme, ranks, bytes by part, ratio and worst error per member."""
    with open_bundle(bundle) as b:
        summary = b.summary()
        if as_json:
            doc = summary.to_dict()
            if tensors:
                doc["tensors"] = [
                    {
                        "name": t.name,
                        "storage": t.storage,
                        "scheme": t.scheme,
                        "rank": t.rank,
                        "side": t.side,
                        "energy": t.energy,
                        "reason": t.reason,
                    }
                    for t in b.manifest.tensors
                ]
            print_json(doc)
            return
        for renderable in info_table(summary, b.manifest if tensors else None):
            out_console.print(renderable)


@cli.command("report", short_help="Size and fidelity: bytes, errors vs baselines, scores.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (every number the tables show).")
@click.option(
    "--png",
    type=click.Path(path_type=Path),
    help="Also write plots (scree curves, errors vs "
    "baselines) to this PNG (needs matplotlib: pip install 'unipack[plots]').",
)
@click.option("--member", "-m", help="With --tensors: per-tensor numbers of this member.")
@click.option("--tensors", is_flag=True, help="Per-tensor table: rank, energy kept, scree, errors vs baselines.")
@click.option(
    "--eval",
    "eval_spec",
    metavar="SPEC",
    help="Score members with evaluate(state_dict, member_name) "
    "-> dict[str, float] from path/to/eval.py[:function] or module:function.",
)
@click.option("--metric", help="Which metric of the eval's dict to compare (default: its first key).")
@click.option(
    "--originals",
    type=click.Path(path_type=Path),
    help="Folder holding the merge's inputs "
    "(found by file name): scores the originals and the per-member SVD baseline too.",
)
@click.option(
    "--baselines",
    "recompute",
    is_flag=True,
    help="Measure the baselines again from --originals (for bundles merged with --no-baselines).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="For a bundle merged with --base: the base model it references, needed where the report "
    "rebuilds members (--eval, --originals).",
)
def report_cmd(
    bundle: Path,
    as_json: bool,
    png: Path | None,
    member: str | None,
    tensors: bool,
    eval_spec: str | None,
    metric: str | None,
    originals: Path | None,
    recompute: bool,
    base: Path | None,
) -> None:
    """Size and fidelity: bytes by part, errors per member, baselines, spectra, eval scores."""
    from unipack.analysis.report import report
    from unipack.render.report_view import report_view
    from unipack.usercode import load_eval

    if png is not None:  # before any work: --png onto the bundle (or an original) would replace it
        check_not_input(png, [bundle, *([originals] if originals else [])])
    hook = load_eval(eval_spec) if eval_spec else None
    with open_bundle(bundle) as b:
        if base is not None:
            b.attach_base(base)
        if member is not None:
            b.member(member)  # a clear error before any work
        progress = (
            None
            if as_json or not err_console.is_terminal
            else (lambda name: err_console.print(f"evaluating {name} ...", end="\r"))
        )
        result = report(b, originals=originals, recompute=recompute, hook=hook, metric=metric, on_member=progress)
        if png is not None:
            from unipack.render.plots import write_png

            write_png(result.to_dict(), png)
        if as_json:
            click.echo(result.to_json())
        else:
            for renderable in report_view(result, member=member, manifest=b.manifest, show_tensors=tensors):
                out_console.print(renderable)
        if png is not None:
            err_console.print(f"plots written to {png}")


@cli.command("verify", short_help="Check every checksum of a bundle; exit 0 sound, 1 not.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="For a bundle merged with --base: the base model it references, so that every member is "
    "rebuilt (without it, members that need the base are not, and the verdict says so).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and every problem found as JSON.")
def verify_cmd(bundle: Path, base: Path | None, as_json: bool) -> None:
    """Check a bundle's header, manifest and every blob's checksum; exit 0 if sound, 1 if not."""
    unchecked: list[str] = []
    try:
        with open_bundle(bundle) as b:
            if base is not None:
                b.attach_base(base)
            problems = b.verify()
            blobs, members = len(b.manifest.blobs), len(b.members)
            unchecked = b.unverified_members()
    except UnipackError as exc:
        problems = [str(exc)]
        blobs = members = 0
    if as_json:
        print_json(
            {
                "bundle": str(bundle),
                "ok": not problems,
                "blobs": blobs,
                "members": members,
                "problems": problems,
                "not_rebuilt": unchecked,
            }
        )
    if problems:
        for line in problems:
            click.echo(f"Error: {line}", err=True)
        raise SystemExit(1)
    if not as_json:
        not_rebuilt = (
            f"; {len(unchecked)} members not rebuilt: they need the base model the bundle references (--base)"
            if unchecked
            else ""
        )
        click.echo(f"{bundle}: OK ({blobs} blobs, {members} members, every checksum verified{not_rebuilt})")


@cli.command("demo", short_help="The end-to-end demo on real fine-tunes (UCI digits).")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("unipack-demo"),
    show_default=True,
    help="Where the bundle and extracted members are written.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the demo population is cached (default $UNIPACK_CACHE or ~/.cache/unipack/demo).",
)
@click.option("--small", is_flag=True, help="A quick 4-member population (what the tests run).")
@click.option(
    "--tensors",
    is_flag=True,
    help="Print the full report: every member's errors and every tensor (default: the 5 costliest).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write every figure the demo found to this JSON file (tools/readme_numbers.py reads it).",
)
def demo_cmd(workdir: Path, cache_dir: Path | None, small: bool, tensors: bool, json_path: Path | None) -> None:
    """Build a population of real fine-tunes (UCI digits), merge, inspect, extract, re-score."""
    try:
        from unipack.demo.run import run_demo
    except ImportError as exc:
        raise UnipackError(f"the demo needs an optional dependency ({exc.name}): pip install 'unipack[demo]'") from None
    if json_path is not None:
        check_writable(json_path, force=True)  # refuse an unwritable path before minutes of work
    figures = run_demo(workdir, cache_dir, out_console, err_console, small=small, tensors=tensors)
    if json_path is not None:
        with atomic_write(json_path, force=True) as f:
            f.write((json.dumps(figures, indent=2) + "\n").encode())


@cli.command("add", short_help="Add a checkpoint to a bundle, onto its existing bases.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("source", type=INPUT)
@click.option("--name", help="Member name (default: SOURCE's file or folder name, without .safetensors, .bin or .pt).")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Write the grown bundle here and leave BUNDLE as it is (default: rewrite BUNDLE in place).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing -o output.")
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="For a bundle merged with --base: the base model it references (required; checked against "
    "its recorded sha256s); the new member's deltas are taken from it too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the add summary, with every tensor's outcome, as JSON.")
def add_cmd(
    bundle: Path,
    source: Path | str,
    name: str | None,
    output: Path | None,
    force: bool,
    base: Path | None,
    as_json: bool,
) -> None:
    """Add a checkpoint as a new member, projected onto the bundle's existing bases.

    A PEFT adapter folder joins a bundle of LoRA adapters module by module, in the form the merge
    chose for each module, or as its own exact factors where that form misses the bundle's rule.
    The add summary is the result: on stdout (--json: as JSON)."""
    from unipack.pack.add import add
    from unipack.render.console import add_summary
    from unipack.render.documents import add_document

    result = add(bundle, source, name=name, output=output, force=force, base=base)
    if as_json:
        print_json(add_document(result))
    else:
        out_console.print(add_summary(result))


@cli.command("export", short_help="Export a member to ONNX, checked with ONNX Runtime.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--member", "-m", required=True, help="Member to export.")
@click.option(
    "--onnx",
    "onnx_path",
    required=True,
    type=click.Path(path_type=Path),
    help="ONNX file to write (weights over 1.5 GiB go to FILE.data beside it).",
)
@click.option(
    "--model",
    "model_spec",
    metavar="SPEC",
    help="Factory build(state_dict, member_name) -> (module, "
    "example_input) from path/to/model.py[:function] or module:function (default function: build); "
    "needed for members without a Hugging Face config.json.",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    metavar="BASE",
    help="The base model. For a bundle merged with --base: the base it references, which the member "
    "is rebuilt from. For a LoRA bundle: the base model's Hugging Face folder; exports the base with "
    "the adapter folded in (as extract --format hf --base writes it).",
)
@click.option(
    "--atol",
    type=float,
    default=1e-4,
    show_default=True,
    help="Largest absolute difference allowed between ONNX Runtime's and torch's outputs.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the check (files, every run's differences) as JSON.")
def export_cmd(
    bundle: Path,
    member: str,
    onnx_path: Path,
    model_spec: str | None,
    base: Path | None,
    atol: float,
    force: bool,
    as_json: bool,
) -> None:
    """Export a member to ONNX and check it against torch with ONNX Runtime; exit 1 if it differs."""
    from unipack.errors import OnnxCheckError
    from unipack.export.onnx import OnnxCheck, export_onnx
    from unipack.render.documents import onnx_document

    def show(check: OnnxCheck) -> None:
        if as_json:
            print_json(onnx_document(check))
        else:
            for line in check.lines():
                click.echo(line)

    with open_bundle(bundle) as b:
        if base is not None and not b.is_lora:  # the base model the bundle references
            b.attach_base(base)
            base = None
        try:
            check = export_onnx(b, member, onnx_path, model=model_spec, base=base, atol=atol, force=force)
        except OnnxCheckError as exc:
            assert isinstance(exc.check, OnnxCheck)
            show(exc.check)  # the numbers first, then the one error line
            raise
    show(check)


def main() -> None:
    """Console entry point."""
    handle_termination_signals()
    cli(prog_name="unipack")
