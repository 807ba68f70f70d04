"""The ``rrome`` command line: a thin Typer shell over the library.

Human output (progress, tables, warnings) goes to standard error; standard output carries only
machine output (``--report -``, ``--json``), so the tool composes in shell pipelines.
Exit codes: 0 success, 1 internal error, 2 bad input or usage, 3 memcheck: does not fit,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); both keep what was done (``--resume``).
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from rrome_cli.config import (
    DEFAULT_RECIPE,
    HParams,
    HParamsError,
    default_hparams,
    key_location,
    load_hparams,
    shipped_hparams,
)
from rrome_cli.engine.stats import CorpusError
from rrome_cli.engine.templates import load_templates
from rrome_cli.memcheck import MemcheckError
from rrome_cli.models.families import UnknownArchitectureError, num_layers
from rrome_cli.models.loading import ModelLoadError, load_config, load_tokenizer
from rrome_cli.models.registry import hparams_name
from rrome_cli.patches import PatchFileError
from rrome_cli.requests import (
    FORMATS,
    STDIN_NAME,
    RequestError,
    check_requests,
    read_phrasings,
    stdin_is_empty,
)

if TYPE_CHECKING:
    from rrome_cli.run import RunOptions, Survey

app = typer.Typer(
    help="Edit facts inside causal language models with R-ROME (rank-one model editing).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

BAD_INPUT = (
    typer.BadParameter,  # options that contradict each other
    RequestError,
    PatchFileError,
    CorpusError,
    HParamsError,
    ModelLoadError,
    UnknownArchitectureError,
    MemcheckError,
    FileNotFoundError,
    FileExistsError,
)

# Options shared by several commands.
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Alias (smollm2-135m, llama2-7b, mistral-7b, gpt2-xl, gpt-j-6b, "
        "llama3-8b, qwen2.5-7b, tiny-llama, ...), local checkpoint path, or hub id. "
        "Default: the embedded SmolLM2-135M-Instruct.",
    ),
]
HParamsOpt = Annotated[
    Path | None,
    typer.Option(
        "--hparams",
        help="Hyperparameter YAML (EasyEdit R-ROME keys). Default: chosen from the model.",
    ),
]
Fp16 = Annotated[bool, typer.Option("--fp16", help="Load the model in float16.")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="Load the model in bfloat16.")]
Devices = Annotated[
    str | None,
    typer.Option(
        "--devices",
        help="cpu, 0, 0,1 or cuda:1. Several devices shard the layers with an "
        "accelerate device map. Default: the first GPU, else the CPU.",
    ),
]
Format = Annotated[
    str, typer.Option("--format", help=f"Request file layout: {', '.join(FORMATS)}.")
]
Limit = Annotated[
    int | None, typer.Option("--limit", min=1, help="Use only the first N valid requests.")
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for templates and generations.")]
SkipInvalid = Annotated[
    bool,
    typer.Option(
        "--skip-invalid", help="Report bad request records and skip them instead of stopping."
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Per-device capacity for the device map, e.g. 0=24GiB,1=24GiB,cpu=64GiB.",
    ),
]


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _dtype(fp16: bool, bf16: bool) -> str | None:
    if fp16 and bf16:
        raise typer.BadParameter("choose one of --fp16 and --bf16")
    return "fp16" if fp16 else "bf16" if bf16 else None


def hparams_file(path: Path | None, model: str | None) -> Path | None:
    """--hparams, else the file shipped for the model; None: the defaults."""
    if path is not None:
        return path
    name = hparams_name(model or "smollm2-135m")
    return shipped_hparams(name) if name else None


def resolve_hparams(path: Path | None, model: str | None) -> tuple[HParams, str]:
    """--hparams, else the file shipped for the model, else the shipped recipe at the layer
    the depth rule chooses (``config.default_hparams``), which it says; and where they came
    from, for run.json."""
    if path is not None:
        return load_hparams(path), f"--hparams {path}"
    source = hparams_file(None, model)
    if source is not None:
        return load_hparams(source), f"shipped for {model or 'smollm2-135m'}: {source.name}"
    hp, why = default_hparams(num_layers(load_config(model)))
    console.print(f"no shipped hparams for {model}: the default recipe, {why}")
    return hp, f"the default recipe ({DEFAULT_RECIPE}.yaml), {why}"


def check_layers(hp: HParams, model: str | None, where: str) -> None:
    """Before the model loads: every layer to edit exists in it (its configuration says how
    many it has); ``where`` names the file and line that chose them."""
    try:
        n_layers = num_layers(load_config(model))  # as the default-layer rule counts them
    except UnknownArchitectureError:
        return  # no count in the configuration: the model's structure is checked on load
    hp.check_layers_within(n_layers, where)


def layers_origin(path: Path | None, model: str | None) -> str:
    source = hparams_file(path, model)
    return key_location(source, "layers") if source else "the depth rule (no --hparams)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``): the run stops as on Ctrl-C, its patches
    folded into patches.safetensors, rather than dying with them left in the journal."""


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body: bad input exits 2 with a located message, anything else exits 1."""
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
            warnings.simplefilter("default")
            warnings.showwarning = lambda msg, *a, **k: console.print(f"[yellow]warning: {msg}")
            return fn()
    except BAD_INPUT as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except KeyboardInterrupt as err:
        how, code = ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        console.print(f"[red]{how}[/red]: finished requests are in the report; use --resume DIR")
        raise typer.Exit(code) from None
    except Exception as err:  # noqa: BLE001 - the one place that turns crashes into exit 1
        console.print(f"[red]internal error:[/red] {type(err).__name__}: {err}")
        raise typer.Exit(1) from None


@app.command("edit")
def edit_cmd(
    requests: Annotated[
        str | None,
        typer.Argument(
            help="Edit requests: JSON Lines or a JSON array (EasyEdit, CounterFact or zsRE "
            "layout); - reads standard input. Not needed with --resume."
        ),
    ] = None,
    model: Model = None,
    hparams: HParamsOpt = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    devices: Devices = None,
    max_memory: MaxMemory = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory. Default: runs/<timestamp>.")
    ] = None,
    fmt: Format = "auto",
    limit: Limit = None,
    seed: Seed = 0,
    skip_invalid: SkipInvalid = False,
    report: Annotated[
        str | None,
        typer.Option("--report", help="- also writes each report line (JSONL) to standard output."),
    ] = None,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="Edits accumulate (default: each edit is reverted after evaluation).",
        ),
    ] = False,
    retrospective: Annotated[
        bool,
        typer.Option(
            "--retrospective", help="Sequential: re-evaluate every request on the final model."
        ),
    ] = False,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant", help="r-rome (default), rome (original keys), or p-rome (prompt keys)."
        ),
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option(
            "--templates", help="Reuse context templates (templates.json of an earlier run)."
        ),
    ] = None,
    phrasings: Annotated[
        Path | None,
        typer.Option(
            "--phrasings",
            help="Relation phrasings (JSON list of template groups, e.g. "
            "data/counterfact-phrasings.json): a request whose prompt is in a group also "
            "optimises its value on the group's other phrasings (up to max_phrasings).",
        ),
    ] = None,
    max_update_ratio: Annotated[
        float | None,
        typer.Option("--max-update-ratio", help="Reject an edit whose ||dW||/||W|| exceeds this."),
    ] = None,
    save_model: Annotated[
        bool,
        typer.Option(
            "--save-model", help="Also write the edited model (safetensors) to RUN/model."
        ),
    ] = False,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted run in this directory.")
    ] = None,
    fluency: Annotated[
        bool,
        typer.Option(
            "--fluency", help="Also measure generation n-gram entropy per request (slower)."
        ),
    ] = False,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus",
            help="Text corpus for key statistics (default: the shipped Wikipedia sample).",
        ),
    ] = None,
    stats_dir: Annotated[
        Path | None, typer.Option("--stats-dir", help="Cache directory of key statistics.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Edit even when memcheck predicts the plan does not fit."),
    ] = False,
    batch: Annotated[
        str,
        typer.Option(
            "--batch",
            help="Independent edits in flight together: a number, or auto (on a GPU the most "
            f"that memcheck says fit, on the CPU {CPU_BATCH}). Results equal one at a time.",
        ),
    ] = "auto",
) -> None:
    """Edit facts: evaluate, edit and re-evaluate each request; write report, patches, summary."""
    import torch

    from rrome_cli.config import VARIANTS
    from rrome_cli.distributed import edit_ranks, rank_dir, ranks_from_env
    from rrome_cli.files import refuse_finished_run
    from rrome_cli.models.loading import load_model
    from rrome_cli.run import (
        RunOptions,
        check_resume,
        load_run,
        run_edits,
        survey_requests,
    )

    _, ranks, local_rank = ranks_from_env()

    def body() -> None:
        nonlocal model, devices
        if resume is not None:
            first = resume if ranks == 1 or (resume / "run.json").exists() else rank_dir(resume, 0)
            prov, hp, opts = load_run(first)
            if ranks == 1:
                check_resume(resume, hp, opts)  # before the model loads
            model = prov["model"]
            dtype = {"float16": "fp16", "bfloat16": "bf16"}.get(prov["dtype"])
        else:
            if requests is None:
                raise typer.BadParameter("give a requests file (or - for standard input)")
            hp, hparams_from = resolve_hparams(hparams, model)
            if variant:
                if variant not in VARIANTS:
                    raise HParamsError(f"--variant must be one of {', '.join(VARIANTS)}")
                hp.variant = variant
            dtype = _dtype(fp16, bf16)
            check_layers(hp, model, layers_origin(hparams, model))
            opts = RunOptions(
                requests=requests,
                fmt=_format(fmt),
                limit=limit,
                skip_invalid=skip_invalid,
                out=out,
                report=report,
                sequential=sequential,
                retrospective=retrospective,
                seed=seed,
                templates=templates,
                phrasings=str(phrasings) if phrasings else None,
                max_update_ratio=max_update_ratio,
                save_model=save_model,
                fluency=fluency,
                stats={"corpus": corpus, "stats_dir": str(stats_dir) if stats_dir else None},
                batch=parse_batch(batch, sequential, hp),
                hparams_from=hparams_from,
            )
            refuse_finished_run(out)  # before the model loads
            check_input(opts)  # so does every bad record of a requests file
            if phrasings:
                read_phrasings(phrasings)  # a bad table fails now, not after the load
            if templates:
                load_templates(templates)  # so does a bad templates file
        if ranks > 1:  # torchrun: each rank on its own GPU, a shared run directory
            if resume is None and out is None:
                raise typer.BadParameter("under torchrun, name the run directory: --out DIR")
            if devices is None and torch.cuda.is_available():
                devices = str(local_rank)
        tok = load_tokenizer(model)  # the requests' lengths, before the weights load
        survey = survey_requests(tok, load_config(model), hp, opts, resume)
        device_map = check_memory(model, dtype, devices, max_memory, hp, force, survey)
        if not opts.batch:  # auto
            opts.batch = auto_batch(model, dtype, devices, max_memory, hp, survey)
            console.print(f"--batch auto: {opts.batch} requests in flight together")
        loaded = load_model(model, dtype, devices, hp, parse_memory(max_memory), device_map)
        if ranks > 1:
            run_dir, summary = edit_ranks(
                loaded, hp, opts, console, resume or out, resume is not None
            )
        else:
            run_dir, summary = run_edits(loaded, hp, opts, console, resume=resume)
        console.print(f"run written to [bold]{run_dir}[/bold]")
        if summary.get("failed_internal"):
            raise typer.Exit(1)

    guarded(body)


# --batch auto on the CPU: 1. On 2 CPU cores SmolLM2's batches of 2-16 ran within 5% of one at
# a time (one request's value pass already keeps the cores busy; make bench's throughput
# section, docs/results.md); on an H200 batches win 9-16x.
CPU_BATCH = 1


def parse_batch(spec: str, sequential: bool, hp: HParams) -> int:
    """``--batch``: a count of 1 or more, or "auto" (0 here, resolved once the device is
    known). Sequential edits depend on each other, and batching takes a one-layer recipe."""
    if spec == "auto":
        return 1 if sequential or len(hp.layers) > 1 else 0
    if not spec.isdigit() or int(spec) < 1:
        raise typer.BadParameter(f"--batch must be a number of 1 or more, or auto; got {spec!r}")
    n = int(spec)
    if n > 1 and sequential:
        raise typer.BadParameter(
            "--batch with --sequential: sequential edits each start from the one before, so "
            "they cannot be made together; drop --batch (or --sequential)"
        )
    if n > 1 and len(hp.layers) > 1:
        raise typer.BadParameter(f"--batch needs a one-layer recipe; layers: {hp.layers}")
    return n


def auto_batch(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: str | None,
    hp: HParams,
    survey: Survey,
) -> int:
    """``--batch auto``: on a GPU the most requests in flight together that memcheck says
    fit (planned for the survey's longest request), on the CPU ``CPU_BATCH``."""
    import torch

    on_gpu = torch.cuda.is_available() and (devices or "0") != "cpu"
    if not on_gpu or (model and model.startswith("tiny-")):
        return CPU_BATCH
    from rrome_cli.memcheck import largest_batch

    extra = hp.max_phrasings if survey.phrasings else 0
    memory = parse_memory(max_memory)
    return largest_batch(model, dtype, devices, memory, hp, survey.shape, extra)


def check_input(opts: RunOptions) -> None:
    """Before the model loads: a requests file is read whole, and a bad record (unless
    ``--skip-invalid``) or a file without requests exits 2; standard input is streamed, each
    record checked at its turn, but one that ends at once is refused now."""
    if opts.requests != "-":
        check_requests(opts.requests, opts.fmt, opts.skip_invalid, opts.limit)
    elif stdin_is_empty():
        raise RequestError(STDIN_NAME, None, None, f"no requests in {STDIN_NAME}")


def parse_memory(spec: str | None) -> dict[str | int, str] | None:
    if not spec:
        return None
    from rrome_cli.memcheck import parse_max_memory

    return parse_max_memory(spec)


def check_memory(
    model: str | None,
    dtype: str | None,
    devices: str | None,
    max_memory: str | None,
    hp: HParams,
    force: bool,
    survey: Survey,
) -> dict[str, int | str] | None:
    """Refuse a plan that memcheck says cannot fit, unless --force; returns its device map.
    The plan is for the survey's longest request, with ``hp.max_phrasings`` more value
    prompts when the requests bring relation phrasings."""
    from rrome_cli.memcheck import plan, render

    if model and model.startswith("tiny-"):
        return None
    extra = hp.max_phrasings if survey.phrasings else 0
    memory = parse_memory(max_memory)
    memory_plan = plan(model, dtype, devices, memory, hp, phrasings=extra, shape=survey.shape)
    if memory_plan.fits:
        return memory_plan.device_map
    render(memory_plan, console)
    if force:
        console.print("[yellow]--force: editing although the plan does not fit")
        return memory_plan.device_map
    console.print("[red]the plan does not fit; see above, or pass --force")
    raise typer.Exit(3)


@app.command("eval")
def eval_cmd(
    requests: Annotated[
        str, typer.Argument(help="Requests to evaluate (as for edit); - is stdin.")
    ],
    model: Model = None,
    patches: Annotated[
        Path | None,
        typer.Option(
            "--patches", help="patches.safetensors of an earlier run, applied to --model first."
        ),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare", help="A second model: locality and metrics of it against --model."
        ),
    ] = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    devices: Devices = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for report.jsonl and summary.json.")
    ] = None,
    fmt: Format = "auto",
    limit: Limit = None,
    seed: Seed = 0,
    skip_invalid: SkipInvalid = False,
    fluency: Annotated[
        bool, typer.Option("--fluency", help="Also measure generation n-gram entropy.")
    ] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report.")
    ] = None,
) -> None:
    """Evaluate requests on a model as is, on a base model plus patches, or against another."""
    from rrome_cli.evaluate.run import EvalOptions, run_eval

    def body() -> None:
        if patches and compare:
            raise typer.BadParameter("choose one of --patches and --compare")
        opts = EvalOptions(
            requests=requests,
            model=model,
            patches=patches,
            compare=compare,
            dtype=_dtype(fp16, bf16),
            devices=devices,
            out=out,
            fmt=_format(fmt),
            limit=limit,
            seed=seed,
            skip_invalid=skip_invalid,
            fluency=fluency,
            html=html,
        )
        run_eval(opts, console)

    guarded(body)


@app.command("memcheck")
def memcheck_cmd(
    model: Model = None,
    hparams: HParamsOpt = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    devices: Devices = None,
    max_memory: MaxMemory = None,
    phrasings: Annotated[
        Path | None,
        typer.Option(
            "--phrasings",
            help="Plan as `rrome edit --phrasings FILE` does: max_phrasings more value prompts.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON on standard output.")
    ] = False,
) -> None:
    """Plan memory from the configuration alone (no weights read): fits, or the cheapest fix.

    Exit code 0 when the plan fits, 3 when it does not.
    """
    from rrome_cli.memcheck import plan, render

    def body() -> bool:
        hp, _ = resolve_hparams(hparams, model)
        check_layers(hp, model, layers_origin(hparams, model))
        if phrasings:
            read_phrasings(phrasings)
        extra = hp.max_phrasings if phrasings else 0
        memory_plan = plan(
            model, _dtype(fp16, bf16), devices, parse_memory(max_memory), hp, phrasings=extra
        )
        if as_json:
            sys.stdout.write(memory_plan.to_json() + "\n")
        else:
            render(memory_plan, console)
        return memory_plan.fits

    if not guarded(body):
        raise typer.Exit(3)


@app.command("stats")
def stats_cmd(
    layer: Annotated[
        list[int] | None, typer.Option("--layer", help="Layer(s); default: the hparams' layers.")
    ] = None,
    model: Model = None,
    hparams: HParamsOpt = None,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus",
            help="Text file (one document per line), JSONL/parquet with a text field, "
            "or a hub dataset id. Default: the shipped Wikipedia sample.",
        ),
    ] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", min=1, help="Token budget.")] = None,
    max_len: Annotated[int, typer.Option("--max-len", min=8, help="Tokens per sequence.")] = 512,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", min=8, help="Tokens per batch.")
    ] = 4096,
    stats_dir: Annotated[Path | None, typer.Option("--stats-dir", help="Cache directory.")] = None,
    fp16: Fp16 = False,
    bf16: Bf16 = False,
    devices: Devices = None,
) -> None:
    """Compute (or find cached) the key second moment C used by the edit's left vector."""
    from rrome_cli.engine.stats import stats_command

    def body() -> None:
        hp, _ = resolve_hparams(hparams, model)
        check_layers(
            replace(hp, layers=sorted(set(layer))) if layer else hp,
            model,
            "--layer" if layer else layers_origin(hparams, model),
        )
        for one in layer or hp.layers:
            result = stats_command(
                model=model,
                layer=one,
                corpus=corpus,
                tokens=tokens or hp.mom2_n_samples,
                max_len=max_len,
                batch_tokens=batch_tokens,
                stats_dir=stats_dir,
                dtype=_dtype(fp16, bf16),
                devices=devices,
                hparams=hp,  # its module names and stats_dir, as `rrome edit` reads them
            )
            console.print(f"layer {one}: C over {result.tokens} tokens -> {result.path}")

    guarded(body)


APPLY_FORMATS = ("checkpoint", "peft")


@app.command("apply")
def apply_cmd(
    patches: Annotated[Path, typer.Argument(help="patches.safetensors of an rrome run.")],
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the patched checkpoint or the adapter.")
    ],
    model: Model = None,
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="checkpoint: the whole edited model (default). peft: a PEFT LoRA adapter "
            "of the edits for --model (its weights are not loaded), which transformers + PEFT "
            "and multi-LoRA servers load.",
        ),
    ] = "checkpoint",
    each: Annotated[
        bool,
        typer.Option(
            "--each", help="With --format peft: one adapter per edit, a folder each under --out."
        ),
    ] = False,
    revert: Annotated[
        bool,
        typer.Option(
            "--revert",
            help="Subtract the patches (newest first) from --model, an edited checkpoint.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace --out when it holds a checkpoint (or an adapter) already."
        ),
    ] = False,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Load the model (peft: store the factors) in float16.")
    ] = False,
    bf16: Annotated[
        bool, typer.Option("--bf16", help="Load the model (peft: store the factors) in bfloat16.")
    ] = False,
    devices: Devices = None,
) -> None:
    """Apply a run's rank-one patches to a base model (or revert them) and save a checkpoint,
    or write them as a PEFT LoRA adapter (--format peft)."""
    from rrome_cli.engine.update import apply_patch, revert_patch
    from rrome_cli.models.loading import load_model, save_model_atomic
    from rrome_cli.patches import check_patches_fit, load_patches, warn_if_independent

    def body() -> None:
        if out_format not in APPLY_FORMATS:
            raise typer.BadParameter(f"--format {out_format}: choose checkpoint or peft")
        if out_format == "peft":
            return export_adapter(patches, out, model, _dtype(fp16, bf16), each, revert, overwrite)
        if each:
            raise typer.BadParameter("--each writes one adapter per edit: it needs --format peft")
        check_checkpoint_target(out, overwrite)
        found = load_patches(patches)  # a bad file fails before the model loads
        loaded = load_model(model, _dtype(fp16, bf16), devices)
        check_patches_fit(loaded.model, found, patches)
        if not revert:
            warn_if_independent(patches, len(found), console)
        for patch in reversed(found) if revert else found:
            (revert_patch if revert else apply_patch)(loaded.model, patch)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model_atomic(loaded, out, replace=overwrite)
        done = "reverted" if revert else "applied"
        console.print(f"{len(found)} patches {done}; checkpoint written to [bold]{out}[/bold]")

    guarded(body)


def export_adapter(
    patches: Path,
    out: Path,
    model: str | None,
    dtype: str | None,
    each: bool,
    revert: bool,
    overwrite: bool,
) -> None:
    """``apply --format peft``: write the adapter(s) and say what they hold."""
    from rrome_cli.export_peft import CONFIG_FILE, EACH_INDEX, export
    from rrome_cli.models.loading import DTYPES

    if revert:
        raise typer.BadParameter(
            "--revert with --format peft: an adapter is added to the base model; to revert "
            "the edits, unload the adapter (or load the base model without it)"
        )
    check_checkpoint_target(out, overwrite, (CONFIG_FILE, EACH_INDEX), "an adapter")
    written = export(patches, model, out, DTYPES[dtype or "fp32"], each)
    for note in written.notes:
        console.print(f"[yellow]note: {note}", highlight=False)
    kind = str(DTYPES[dtype or "fp32"]).replace("torch.", "")
    if each:
        names = ", ".join(name for name, _ in written.adapters[:10])
        more = len(written.adapters) - 10
        names += f" and {more} more" if more > 0 else ""
        console.print(
            f"{len(written.adapters)} LoRA adapters (one per edit, {kind}) written to "
            f"[bold]{out}[/bold]: {names}"
        )
        return
    adapter = written.adapters[0][1]
    ranks = ", ".join(f"{f.module} rank {f.rank}" for f in adapter.factors)
    console.print(f"LoRA adapter ({kind}; {ranks}) written to [bold]{out}[/bold]")


def check_checkpoint_target(
    out: Path,
    overwrite: bool,
    markers: tuple[str, ...] = ("config.json",),
    what: str = "a checkpoint",
) -> None:
    """``--out`` of apply is new, or a checkpoint (a directory with config.json; an adapter:
    with adapter_config.json or adapters.json) that ``overwrite`` lets us replace; never any
    other directory or a file, which replacing would delete."""
    if not out.exists():
        return
    if not (out.is_dir() and any((out / m).is_file() for m in markers)):
        raise FileExistsError(f"--out {out}: exists and is not {what}; choose a new path")
    if not overwrite:
        raise FileExistsError(f"--out {out}: holds {what} already (--overwrite replaces it)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
