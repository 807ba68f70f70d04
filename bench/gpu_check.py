"""Check ``rrome memcheck``'s prediction against torch's measured peak on a GPU.

For Llama-2-7B and Mistral-7B architectures (shipped configs, random bf16 weights, a tiny local
tokenizer: no download), on one GPU:
  1. one edit with everything on the GPU: predicted weights + working set vs
     ``torch.cuda.max_memory_allocated`` over building the Cholesky factor and the edit;
  2. the same edit with the layers split between the GPU and the CPU (accelerate offload, the
     device map memcheck plans), checked to give the same update as run 1.
  3. every tiny family in fp16 and bf16 on the device: the edit runs, W keeps its dtype and
     device, and the update lands as the fp32 patch rounded once.
  4. throughput of ``rrome edit --batch N``: SmolLM2-shaped random bf16 weights at batch
     1 / 8 / 32 / auto, and a Llama-2-7B-shaped one at 1 / 4 / 8 with its peak memory against
     memcheck's plan for that batch (weights + N edit working sets); same requests, metrics
     beside each speed. Random weights never meet the stop test: every edit runs its cap.
Prints the tables and writes the throughput rows to ``--json``. ``--dry-run`` does the same on
the CPU with tiny-llama (disk offload for the split), to check the script without a GPU;
``--only throughput`` runs section 4 alone.

    python bench/gpu_check.py                  # on a GPU machine (about 3 minutes on an H100)
    python bench/gpu_check.py --dry-run        # anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import dispatch_model
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.edit import edit
from rrome_cli.engine.templates import generate_templates
from rrome_cli.engine.update import KeyCovariance
from rrome_cli.memcheck import GiB, geometry_for, live_tensor_bytes, plan
from rrome_cli.models.families import module_names, weight_as_out_in
from rrome_cli.models.loading import load_config
from rrome_cli.models.tiny import tiny_model, tiny_tokenizer
from rrome_cli.requests import EditRequest

REQUEST = EditRequest(
    prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English"
)


def build(alias: str, device: torch.device, dtype: torch.dtype):  # noqa: ANN201
    """Random weights in ``dtype`` on ``device`` and a tokenizer whose ids fit the vocabulary."""
    if alias.startswith("tiny-"):
        model, tok = tiny_model(alias[5:], dtype=dtype)
        return model.to(device), tok
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(load_config(alias), dtype=dtype)
    return model.eval(), tiny_tokenizer("sp")


def random_second_moment(d_in: int, device: torch.device) -> torch.Tensor:
    """C = K^T K / n of random keys: positive definite, fp32 on the CPU like a cached C."""
    gen = torch.Generator(device).manual_seed(0)
    keys = torch.randn(2 * d_in, d_in, generator=gen, device=device)
    return (keys.T @ keys / keys.shape[0]).cpu()


def resident(model: torch.nn.Module, device: torch.device) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == device)


def peak_total(fn, device: torch.device, model: torch.nn.Module) -> int:  # noqa: ANN001
    """Peak bytes on ``device`` while ``fn`` runs, weights included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    before = resident(model, device)
    with live_tensor_bytes() as tracker:
        fn()
    return before + tracker.peak


def run(
    alias: str, device: torch.device, dtype_name: str, console: Console, split_too: bool = True
) -> list[list[str]]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    release(device)  # accelerate's hooks hold earlier models in reference cycles
    hp = load_hparams(shipped_hparams(alias if not alias.startswith("tiny-") else "tiny-llama"))
    hp.v_num_grad_steps = 5
    layer = hp.layers[0]
    model, tok = build(alias, device, dtype)
    names = module_names(type(model).__name__, hp.module_overrides())
    templates = generate_templates(model, tok, hp.context_template_length_params)
    geometry = geometry_for(tok, REQUEST, templates, whole_bare=hp.v_realized_delta == "bare")
    d_in = weight_as_out_in(model.get_submodule(names.rewrite(layer))).shape[1]
    mom2 = random_second_moment(d_in, device) if hp.mom2_adjustment else None
    key = 0 if device.type == "cuda" else "cpu"
    size = (
        torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 64 * GiB
    )
    rows = []

    def one_edit(net: torch.nn.Module) -> tuple[int, float, torch.Tensor]:
        out: dict[str, object] = {}

        def work() -> None:
            cov = {layer: KeyCovariance(mom2, hp.mom2_ridge, device)} if mom2 is not None else None
            out["result"] = edit(net, tok, REQUEST, hp, names, cov, templates)

        start = time.perf_counter()
        peak = peak_total(work, device, net)
        right = out["result"].layers[0].patch.right  # type: ignore[attr-defined]
        return peak, time.perf_counter() - start, right

    # 1. everything on one device
    single = plan(alias, dtype_name, str(device), {key: size}, hp, geometry=geometry)
    measured, seconds, right = one_edit(model)
    predicted = single.predicted_allocated[single.edit_device]
    rows.append(
        [
            f"{alias} {dtype_name}",
            "one device",
            _g(predicted),
            _g(measured),
            f"{predicted / measured - 1:+.1%}",
            f"{seconds:.1f}",
            "-",
        ]
    )

    if not split_too:
        return rows
    # 2. layers split between the device and an offload target (CPU on a GPU; disk on a CPU)
    weights = single.devices[0].weights
    del model  # the split run measures its own weights only
    release(device)
    spill = "cpu" if device.type == "cuda" else "disk"
    for share in (0.5, 0.6, 0.7, 0.8, 0.9):  # the least room that keeps layer l on the device
        limits = {key: int(weights * share), spill: 512 * GiB}
        split = plan(alias, dtype_name, str(device), limits, hp, geometry=geometry)
        if not split.problems:
            break
    else:
        console.print(f"[red]{alias}: no split keeps layer {layer} on {device}[/red]")
        return rows
    # Only decoder layers go off the device: the engine reads the embeddings' and the head's
    # device from their weights, which offloading leaves on the meta device.
    blocks = names.layer_module_tmp.split("{}")[0]
    chosen = {n: (w if n.startswith(blocks) else key) for n, w in split.device_map.items()}
    split = plan(alias, dtype_name, str(device), limits, hp, geometry=geometry, device_map=chosen)
    fresh, _ = build(alias, device, dtype)
    for name, where in split.device_map.items():
        if where == "cpu" and name:
            fresh.get_submodule(name).to("cpu")
    with tempfile.TemporaryDirectory() as folder:
        fresh = dispatch_model(fresh, split.device_map, main_device=key, offload_dir=folder)
        measured, seconds, right_split = one_edit(fresh)
    predicted = split.predicted_allocated[split.edit_device]
    same = torch.allclose(right_split.float().cpu(), right.float().cpu(), rtol=2e-2, atol=1e-3)
    offloaded = sum(1 for v in split.device_map.values() if v == spill)
    rows.append(
        [
            f"{alias} {dtype_name}",
            f"split ({offloaded} modules on {spill})",
            _g(predicted),
            _g(measured),
            f"{predicted / measured - 1:+.1%}",
            f"{seconds:.1f}",
            "yes" if same else "NO",
        ]
    )
    del fresh
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def tiny_dtypes(device: torch.device) -> Table:
    """3. every tiny family in fp16 and bf16 on ``device``."""
    table = Table(title=f"tiny families on {device}: half-precision edits")
    for column in (
        "family",
        "dtype",
        "W dtype/device kept",
        "W' = round(W + fp32 patch)",
        "||dW||/||W||",
        "steps",
        "seconds",
    ):
        table.add_column(column)
    for family in ("gpt2", "gptj", "gpt-neox", "llama", "mistral", "qwen2"):
        for dtype in (torch.float16, torch.bfloat16):
            model, tok = tiny_model(family, dtype=dtype)
            model = model.to(device)
            hp = load_hparams(shipped_hparams(f"tiny-{family}"))
            hp.v_num_grad_steps = 20
            names = module_names(type(model).__name__, hp.module_overrides())
            module = model.get_submodule(names.rewrite(hp.layers[0]))
            was = weight_as_out_in(module).detach().float().clone()  # (d_out, d_in)
            start = time.perf_counter()
            result = edit(model, tok, REQUEST, hp, names)
            seconds = time.perf_counter() - start
            patch = result.layers[0].patch
            w = module.weight.detach()
            kept = w.dtype == dtype and w.device.type == device.type
            # W' must be (W + delta W in fp32) rounded once to the weight's dtype
            expected = (was + patch.delta_w(device).float()).to(dtype).float()
            same = bool(torch.equal(weight_as_out_in(module).float(), expected))
            table.add_row(
                family,
                str(dtype).removeprefix("torch."),
                "yes" if kept else "NO",
                "yes" if same else "NO",
                f"{result.layers[0].update_ratio:.2e}",
                str(result.layers[0].steps),
                f"{seconds:.2f}",
            )
    return table


def throughput(
    device: torch.device, dry_run: bool, work: Path, console: Console
) -> tuple[Table, list[dict]]:
    """4. edits per second at several --batch sizes, and (7B shape) peak vs memcheck."""
    from throughput import measure, phase_peaks, without_statistics  # beside this script

    from rrome_cli.memcheck import largest_batch
    from rrome_cli.models.loading import LoadedModel

    sample = Path(__file__).resolve().parents[1] / "data" / "counterfact-sample.jsonl"
    requests = work / "requests.jsonl"
    lines = sample.read_text().splitlines()
    requests.write_text("\n".join(lines * 4) + "\n")  # 80 requests
    cases = (
        [("tiny-llama", "fp32", [1, 4], 8, 3)]
        if dry_run
        else [
            ("smollm2-135m", "bf16", [1, 8, 32, 0], 64, 10),
            ("llama2-7b", "bf16", [1, 4, 8], 16, 5),
        ]
    )
    table = Table(title=f"--batch throughput on {device} (random weights, C = I)")
    for column in (
        "model",
        "batch",
        "edits",
        "edits/s",
        "x batch 1",
        "peak MiB",
        "plan MiB",
        "+ reserve",
        "post rewrite / locality",
    ):
        table.add_column(column)
    rows = []
    for alias, dtype_name, batches, n, steps in cases:
        release(device)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        model, tok = build(alias, device, dtype)
        hp = without_statistics(
            load_hparams(shipped_hparams(alias if not dry_run else "tiny-llama"))
        )
        hp.v_num_grad_steps = steps
        names = module_names(type(model).__name__, hp.module_overrides())
        loaded = LoadedModel(model, tok, names, alias, None)
        key = 0 if device.type == "cuda" else "cpu"
        size = (
            torch.cuda.get_device_properties(device).total_memory
            if device.type == "cuda"
            else 64 * GiB
        )
        planned = alias if not dry_run else "tiny-llama"
        auto = largest_batch(planned, dtype_name, str(device), {key: size}, hp)
        auto_24 = largest_batch(planned, dtype_name, str(device), {key: "24GiB"}, hp)
        batches = [b or auto for b in batches]

        for row in measure(loaded, hp, requests, batches, work / alias, limit=n):
            row |= {"model": alias, "dtype": dtype_name, "steps_cap": steps, "auto": auto}
            memory_plan = plan(planned, dtype_name, str(device), {key: size}, hp, jobs=row["batch"])
            d = next(d for d in memory_plan.devices if d.device == memory_plan.edit_device)
            row |= {
                "auto_24gib": auto_24,
                "plan_mib": round((d.weights + d.edit) / 2**20),
                "plan_reserve_mib": round(d.total / 2**20),  # what must fit: >= peak MiB
            }
            rows.append(row)
            post = row["post"]
            table.add_row(
                alias, str(row["batch"]) + (" (auto)" if row["batch"] == auto else ""),
                str(row["edits"]), f"{row['edits_per_second']:.2f}", f"{row['speedup']:.2f}",
                str(row["peak_mib"] or "-"), str(row["plan_mib"]), str(row["plan_reserve_mib"]),
                f"{post.get('rewrite_acc', 0):.3f} / {post.get('locality', 0):.3f}",
            )  # fmt: skip
        for batch in (1, batches[-2] if len(batches) > 2 else batches[-1]):
            gc.collect()  # where the memory goes, by phase (a slower, traced run)
            peaks = phase_peaks(loaded, hp, requests, batch, work / alias, limit=min(n, 2 * batch))
            rows.append({"model": alias, "dtype": dtype_name, "phases_mib": peaks})
            console.print(f"{alias} batch {batch} phases (MiB): {peaks}")
        del model, loaded
    return table, rows


def release(device: torch.device) -> None:
    """Free what earlier runs left, so each peak is its own (cuBLAS keeps its workspaces)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated(device)
        if left > 256 * 2**20:
            raise RuntimeError(f"{left / 2**20:.0f} MiB still allocated from an earlier run")


def _g(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny-llama on the CPU")
    parser.add_argument("--models", default="llama2-7b,mistral-7b")
    parser.add_argument("--only", choices=["throughput"], help="run one section alone")
    parser.add_argument("--json", type=Path, help="write the throughput rows here")
    args = parser.parse_args()
    console = Console()
    if args.dry_run:
        device, models, dtype = torch.device("cpu"), ["tiny-llama"], "fp32"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --dry-run")
        device, models, dtype = torch.device("cuda:0"), args.models.split(","), "bf16"
    with tempfile.TemporaryDirectory() as work:
        speed, rows = throughput(device, args.dry_run, Path(work), console)
    console.print(speed)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": str(torch.cuda.get_device_name(device))
                    if device.type == "cuda"
                    else "cpu",
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    if args.only:
        return
    table = Table(title=f"memcheck vs measured peak on {device} ({dtype}, MiB, weights included)")
    for column in (
        "model",
        "placement",
        "predicted",
        "measured",
        "error",
        "seconds",
        "same update",
    ):
        table.add_column(column)
    for alias in models:
        for row in run(alias, device, dtype, console):
            table.add_row(*row)
    if not args.dry_run:  # the dtype users crash on elsewhere, one device only
        for row in run(models[0], device, "fp16", console, split_too=False):
            table.add_row(*row)
    console.print(table)
    console.print(tiny_dtypes(device))


if __name__ == "__main__":
    main()
