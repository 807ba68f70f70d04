"""Batched independent editing (``--batch``): the same patches and metrics as one at a time,
continuous batching, reports in request order, resume, and the per-row edited models of the
batched evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from rrome_cli.cli import app
from rrome_cli.config import HParams, load_hparams, shipped_hparams
from rrome_cli.engine import values as values_module
from rrome_cli.engine.update import (
    KeyCovariance,
    Patch,
    apply_patch,
    left_vector,
    left_vectors,
    restore_weight,
    rows_patched,
)
from rrome_cli.files import PATCH_JOURNAL
from rrome_cli.models.families import module_names, weight_as_out_in
from rrome_cli.models.loading import load_model
from rrome_cli.models.tiny import tiny_model
from rrome_cli.patches import load_patches
from rrome_cli.run import RunOptions, run_edits

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "counterfact-sample.jsonl"
QUIET = Console(stderr=True, quiet=True)
# The random tiny models barely move a target's probability (about 1/vocab): a stop at
# 0.0025 lets some of the sample's requests stop at once while the others run every step.
UNEVEN_STOPS = {"v_stop": "target", "v_stop_prob": 0.0025, "v_num_grad_steps": 25}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "report.jsonl").read_text().splitlines()]


def assert_same_run(batched: Path, single: Path) -> None:
    """Equal reports (every metric and status; guard figures within fp32 tolerance) and
    patches within fp32 tolerance, in the same order."""
    got, want = records(batched), records(single)
    assert [r["index"] for r in got] == [r["index"] for r in want] == list(range(len(want)))
    for a, b in zip(got, want, strict=True):
        assert a["status"] == b["status"] and a["request"] == b["request"]
        for phase in ("pre", "post"):
            assert a.get(phase, {}).keys() == b.get(phase, {}).keys()
            for key, value in b.get(phase, {}).items():
                assert a[phase][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (phase, key)
        assert a["guard"]["steps"] == b["guard"]["steps"]
        assert a["guard"]["target_prob"] == pytest.approx(b["guard"]["target_prob"], rel=1e-4)
    batched_patches, single_patches = (
        load_patches(d / "patches.safetensors") for d in (batched, single)
    )
    assert [p.request for p in batched_patches] == [p.request for p in single_patches]
    assert len(single_patches) == sum(r["status"] == "applied" for r in want) > 0
    for a, b in zip(batched_patches, single_patches, strict=True):
        torch.testing.assert_close(a.left, b.left, rtol=1e-5, atol=1e-6)  # no optimisation
        # delta is ~25 Adam steps: fp32 rounding (1e-7 at the first step, where both passes
        # differ only in how rows are packed) grows step by step, Adam scaling each element's
        # step by its own gradient's size (test_value_batch_first_steps_equal_one_at_a_time)
        assert (a.right - b.right).norm() <= 2e-3 * b.right.norm()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_run_equals_one_at_a_time(tmp_path: Path, family: str) -> None:
    hp = load_hparams(shipped_hparams(f"tiny-{family}"))
    runs = {}
    for batch in (1, 3):
        opts = RunOptions(requests=str(SAMPLE), limit=7, out=tmp_path / f"b{batch}", batch=batch)
        runs[batch], _ = run_edits(load_model(f"tiny-{family}"), hp, opts, QUIET)
    assert_same_run(runs[3], runs[1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_value_batch_first_steps_equal_one_at_a_time(family: str) -> None:
    """Three requests' deltas optimised together equal each optimised alone after one and two
    steps, to fp32 rounding: each row carries its own request's delta only, so the summed
    loss gives each delta exactly its own gradient."""
    from rrome_cli.engine.edit import prepare_layer
    from rrome_cli.requests import read_requests

    loaded = load_model(f"tiny-{family}")
    requests = list(read_requests(str(SAMPLE), limit=3))
    for steps in (1, 2):
        hp = replace(load_hparams(shipped_hparams(f"tiny-{family}")), v_num_grad_steps=steps)
        (layer,) = hp.layers
        prepared = prepare_layer(
            loaded.model, loaded.tok, requests, hp, loaded.names, layer, KeyCovariance(None),
            ["{}", "The capital of Japan is Tokyo. {}", "Rome. {}"],
        )  # fmt: skip

        def optimised(group: list, hp: HParams = hp, layer: int = layer) -> dict:
            batch = values_module.ValueBatch(loaded.model, loaded.names, layer, hp)
            for p in group:
                batch.add(p.value_job(loaded.tok, hp, batch))
            deltas = {}
            while len(batch):
                deltas |= {id(job.tag): job.delta.detach() for job in batch.step()}
            return deltas

        together = optimised(prepared)
        for p in prepared:
            alone = optimised([p])[id(p)]
            assert alone.norm() > 0
            assert (together[id(p)] - alone).norm() <= 1e-6 * alone.norm()


@pytest.mark.slow
def test_batched_smollm2_counterfact_run_equals_one_at_a_time(tmp_path: Path) -> None:
    """The real model with its shipped recipe (C = I: statistics are not what batching
    changes) on CounterFact records: requests stop at their own steps, and the batched run's
    reports and patches are the one-at-a-time run's."""
    hp = replace(load_hparams(shipped_hparams("smollm2-135m")), mom2_adjustment=False)
    loaded = load_model("smollm2-135m", "fp32", "cpu")
    runs = {}
    for batch in (1, 3):
        opts = RunOptions(requests=str(SAMPLE), limit=3, out=tmp_path / f"b{batch}", batch=batch)
        runs[batch], _ = run_edits(loaded, hp, opts, QUIET)
    assert_same_run(runs[3], runs[1])


def test_batched_bare_recipe_equals_one_at_a_time(tmp_path: Path) -> None:
    """SmolLM2's recipe shape: the bare prompt run whole with its read shares, a target stop
    (requests stop at different steps) and phrasings."""
    hp = replace(
        load_hparams(shipped_hparams("tiny-llama")),
        v_realized_delta="bare",
        k_bare_min=0.6,
        **UNEVEN_STOPS,
    )
    phrasings = DATA / "counterfact-phrasings.json"
    runs = {}
    for batch in (1, 4):
        opts = RunOptions(
            requests=str(SAMPLE), limit=6, out=tmp_path / f"b{batch}", batch=batch,
            phrasings=str(phrasings),
        )  # fmt: skip
        runs[batch], _ = run_edits(load_model("tiny-llama"), hp, opts, QUIET)
    steps = [r["guard"]["steps"] for r in records(runs[1])]
    assert len(set(steps)) > 1  # requests leave the batch at different steps
    assert_same_run(runs[4], runs[1])


def test_continuous_batching_refills_freed_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never more than --batch in flight; a request that stops makes room for the next while
    the others go on, and the report still comes in request order."""
    in_flight: list[list[object]] = []
    step = values_module.ValueBatch.step

    def spy(self: values_module.ValueBatch) -> list:
        in_flight.append([job.tag.request.case_id for job in self.jobs])  # type: ignore[attr-defined]
        return step(self)

    monkeypatch.setattr(values_module.ValueBatch, "step", spy)
    hp = replace(load_hparams(shipped_hparams("tiny-llama")), **UNEVEN_STOPS)
    opts = RunOptions(requests=str(SAMPLE), limit=8, out=tmp_path / "run", batch=3)
    run_dir, _ = run_edits(load_model("tiny-llama"), hp, opts, QUIET)
    assert max(len(ids) for ids in in_flight) == 3
    joined_late = [
        later for before, later in zip(in_flight, in_flight[1:], strict=False)
        if set(before) & set(later) and set(later) - set(before)
    ]  # fmt: skip
    assert joined_late  # a request joined while others were mid-way
    assert [r["index"] for r in records(run_dir)] == list(range(8))


def test_interrupted_batched_run_resumes_each_request_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hp = load_hparams(shipped_hparams("tiny-llama"))

    def options(out: Path) -> RunOptions:
        return RunOptions(requests=str(SAMPLE), limit=7, out=out, batch=3)

    full, _ = run_edits(load_model("tiny-llama"), hp, options(tmp_path / "full"), QUIET)

    def stop_after_four(record: dict) -> None:
        if record["index"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_edits(
            load_model("tiny-llama"), hp, options(tmp_path / "cut"), QUIET,
            after_record=stop_after_four,
        )  # fmt: skip
    assert len(records(tmp_path / "cut")) == 4
    assert len(load_patches(tmp_path / "cut" / "patches.safetensors")) == 4
    assert not (tmp_path / "cut" / PATCH_JOURNAL).exists()
    run_edits(
        load_model("tiny-llama"), hp, options(tmp_path / "cut"), QUIET, resume=tmp_path / "cut"
    )
    assert_same_run(tmp_path / "cut", full)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_rows_patched_is_each_rows_own_edited_model(family: str) -> None:
    """Row b of one pass under ``rows_patched`` gives the logits of the model that
    ``apply_patch`` makes of its patches (Conv1D included), the weights untouched."""
    model, _ = tiny_model(family)
    names = module_names(type(model).__name__)
    gen = torch.Generator().manual_seed(0)

    def patch(layer: int) -> Patch:
        w = weight_as_out_in(model.get_submodule(names.rewrite(layer)))
        left, right = torch.randn(w.shape[1], generator=gen), torch.randn(w.shape[0], generator=gen)
        return Patch(layer, names.rewrite(layer), left, right * 0.5, str(w.dtype))

    row_patches = [[patch(1)], [], [patch(1), patch(0)], [patch(0)]]
    ids = torch.randint(0, model.config.vocab_size, (4, 7), generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), rows_patched(model, row_patches):
        together = model(input_ids=ids).logits
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for b, patches in enumerate(row_patches):
        originals = [(p.module, apply_patch(model, p)) for p in patches]
        with torch.no_grad():
            alone = model(input_ids=ids[b : b + 1]).logits[0]
        for name, original in reversed(originals):
            restore_weight(model.get_submodule(name), original)
        torch.testing.assert_close(together[b], alone, rtol=1e-5, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-3  # the edits do change the logits


def test_one_solve_for_many_keys_equals_one_each() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 24, generator=gen)
    cov = KeyCovariance(x.T @ x / 400, ridge=1e-3)
    cov.protect(torch.randn(24, generator=gen), 2.0)
    keys = torch.randn(5, 24, generator=gen)
    u, denominators = left_vectors(cov, keys)
    for i, k in enumerate(keys):
        u_i, d_i = left_vector(cov, k)
        torch.testing.assert_close(u[i], u_i, rtol=1e-5, atol=1e-6)
        assert denominators[i] == pytest.approx(d_i, rel=1e-5)
        c = (x.T @ x / 400).double() + cov.ridge * torch.eye(24, dtype=torch.float64)
        c += torch.outer(cov.protected[0], cov.protected[0])
        exact = torch.linalg.solve(c, k.double())
        torch.testing.assert_close(u[i].double(), exact / exact.norm(), rtol=1e-4, atol=1e-6)


def test_batch_option_refuses_sequential_and_bad_counts(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["edit", str(SAMPLE), "--model", "tiny-llama", "--out", str(tmp_path / "r")]
    sequential = runner.invoke(app, [*base, "--sequential", "--batch", "2"])
    assert sequential.exit_code == 2 and "--sequential" in sequential.output
    for bad in ("0", "-3", "many"):
        result = runner.invoke(app, [*base, "--batch", bad])
        assert result.exit_code == 2 and "--batch" in result.output, bad
    assert not (tmp_path / "r").exists()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 rrome edit ...`` on the CPU (gloo), tiny-llama."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["-m", "rrome_cli.cli", "edit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_torchrun_ranks_split_the_run_and_rank_0_merges_it(tmp_path: Path) -> None:
    """Two processes edit alternate requests and the merged run equals one process's; a rank
    killed part-way resumes with every request once."""
    edit = [str(SAMPLE), "--model", "tiny-llama", "--limit", "7", "--batch", "2"]
    single = tmp_path / "single"
    assert CliRunner().invoke(app, ["edit", *edit, "--out", str(single)]).exit_code == 0
    done = torchrun(*edit, "--out", str(tmp_path / "dist"))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        own = records(tmp_path / "dist" / "ranks" / str(rank))
        assert [r["index"] for r in own] == list(range(rank, 7, 2))
    assert_same_run(tmp_path / "dist", single)
    assert "7 requests: 7 applied" in (tmp_path / "dist" / "report.html").read_text()

    # rank 1 killed after its first edit: its report keeps one line, the merge is not made
    cut = tmp_path / "dist" / "ranks" / "1" / "report.jsonl"
    cut.write_text(cut.read_text().splitlines(keepends=True)[0])
    (tmp_path / "dist" / "report.jsonl").unlink()
    resumed = torchrun("--resume", str(tmp_path / "dist"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "dist", single)
