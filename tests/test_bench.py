"""The bench's own measurements that are not a run of `rrome edit` (bench/bench.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
from pathlib import Path
from types import ModuleType

import pytest
import torch
from rich.console import Console

from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.models.loading import load_model
from rrome_cli.requests import read_requests
from rrome_cli.run import RunOptions, run_edits

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "counterfact-sample.jsonl"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_said_counts_whole_words() -> None:
    said = _bench().said
    assert said("Manchester, Manchester, Manchester", " Manchester") == 3
    assert said("Brazil is not Brazilian", "Brazil") == 1
    assert said("New York and New Yorkers", "New York") == 1


def test_fluency_from_patches_equals_fluency_measured_in_the_run(tmp_path: Path) -> None:
    """Each patch applied alone afterwards gives the generation the run itself scored, and the
    model is left as it was; a second pass measures nothing again."""
    loaded = load_model("tiny-llama")
    hp = load_hparams(shipped_hparams("tiny-llama"))
    opts = RunOptions(requests=str(SAMPLE), limit=4, out=tmp_path / "run", fluency=True)
    run_dir, summary = run_edits(loaded, hp, opts, Console(quiet=True))
    report = [json.loads(line) for line in (run_dir / "report.jsonl").read_text().splitlines()]
    assert any(r["pre"]["fluency"] != r["post"]["fluency"] for r in report)  # edits show
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    stats = _bench().fluency(loaded, run_dir)

    rows = [json.loads(line) for line in (run_dir / "fluency.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [r["index"] for r in report]
    for row, record in zip(rows, report, strict=True):  # pre: one batch, so within rounding
        assert row["pre"]["fluency"] == pytest.approx(record["pre"]["fluency"], rel=1e-9)
        assert row["post"]["fluency"] == record["post"]["fluency"]
        assert row["repeats"] == _bench().said(row["post_text"], record["request"]["target_new"])
    assert stats["post"]["repeats_of"] == len(rows)
    assert stats["post"]["repeats_over_2"] == sum(r["repeats"] > 2 for r in rows)
    for phase in ("pre", "post"):
        expected = summary["metrics"][phase]["fluency"]["mean"]
        assert stats[phase]["mean"] == pytest.approx(expected, rel=1e-9)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _bench().fluency(loaded, run_dir) == stats
    assert len((run_dir / "fluency.jsonl").read_text().splitlines()) == len(rows)


def test_a_section_measured_with_an_earlier_recipe_is_kept_aside_and_measured_again(
    tmp_path: Path,
) -> None:
    bench = _bench()
    calls: list[str] = []

    def todo(recipe: dict) -> dict:
        return {"speed": bench.Section(lambda: calls.append("speed") or {"x": len(calls)}, recipe)}

    first, stale = bench.run_sections(todo({"v_lr": 1.0}), tmp_path, [])
    assert calls == ["speed"] and stale == [] and first["speed"]["x"] == 1
    again, _ = bench.run_sections(todo({"v_lr": 1.0}), tmp_path, [])
    assert calls == ["speed"] and again == first  # kept, not measured twice

    table, stale = bench.run_sections(todo({"v_lr": 2.0}), tmp_path, [], measure=False)
    assert table == {} and stale == ["speed"] and calls == ["speed"]  # not shown as current
    new, stale = bench.run_sections(todo({"v_lr": 2.0}), tmp_path, [])
    assert calls == ["speed", "speed"] and stale == [] and new["speed"]["x"] == 2
    assert new["speed"]["recipe"] == {"v_lr": 2.0}
    (earlier,) = (tmp_path / "earlier").iterdir()  # the first measurement, moved, not lost
    assert json.loads(earlier.read_text())["recipe"] == {"v_lr": 1.0}
    # a hyperparameter added since, at its default, is the same recipe: nothing to measure
    kept, stale = bench.run_sections(todo({"v_lr": 2.0, "protect_weight": 0.0}), tmp_path, [])
    assert calls == ["speed", "speed"] and stale == [] and kept["speed"]["x"] == 2
    _, stale = bench.run_sections(todo({"v_lr": 2.0, "protect_weight": 0.5}), tmp_path, [], False)
    assert stale == ["speed"]


def test_a_multi_layer_recipe_counts_the_steps_and_seconds_of_every_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speed and quality add up the layers a multi-layer edit optimises one after another."""
    bench = _bench()
    loaded = load_model("tiny-llama")
    hp = load_hparams(shipped_hparams("tiny-llama"))
    hp.layers = [0, 1]
    results, bench_edit = [], bench.edit

    def recorded_edit(*args: object) -> object:
        results.append(bench_edit(*args))
        return results[-1]

    monkeypatch.setattr(bench, "edit", recorded_edit)
    requests = list(read_requests(SAMPLE, limit=3))
    speed = bench.speed(loaded, hp, requests)

    assert [len(r.layers) for r in results] == [2, 2, 2]
    steps = [sum(e.steps for e in r.layers) for r in results]
    values = [sum(e.seconds["values"] for e in r.layers) for r in results]
    assert speed["steps"]["median"] == statistics.median(steps)
    assert speed["values"]["median"] == pytest.approx(statistics.median(values))

    summary = bench.quality(loaded, hp, SAMPLE, tmp_path / "run", limit=3)
    report = [json.loads(x) for x in (tmp_path / "run" / "report.jsonl").read_text().splitlines()]
    per_layer = [[g["steps"] for g in r["guard"]["layers"]] for r in report]
    assert [len(s) for s in per_layer] == [2, 2, 2]
    assert summary["edit"]["steps_median"] == statistics.median(sum(s) for s in per_layer)
    capped = sum(max(s) >= hp.v_num_grad_steps for s in per_layer)
    assert summary["edit"]["capped"] == capped


def test_retiring_twice_within_a_second_keeps_both(tmp_path: Path) -> None:
    bench = _bench()
    for text in ("first", "second"):
        (tmp_path / "speed.json").write_text(text)
        os.utime(tmp_path / "speed.json", (0, 0))  # the same stamp for both
        bench.retire(tmp_path / "speed.json", tmp_path)
    kept = sorted(p.read_text() for p in (tmp_path / "earlier").iterdir())
    assert kept == ["first", "second"]


def test_rephrase_ceiling_counts_the_same_question_records_by_each_reader() -> None:
    spec = importlib.util.spec_from_file_location("split", ROOT / "bench" / "rephrase_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    first = {"a": True, "b": True, "c": False, "d": False, "x": True}
    second = {"a": True, "b": False, "c": True, "d": False}  # "x" unlabelled: left out
    bound = split.ceiling(first, second)
    assert bound == {"first reader": 0.5, "either reader": 0.75, "both readers": 0.25}


def test_a_kept_run_resumes_as_the_run_itself(tmp_path: Path) -> None:
    """bench/keep_run.py copies a sequential run with one journal file per edit and no folded
    patch file; resumed from the copy, the run goes on as it would have from the original."""
    spec = importlib.util.spec_from_file_location("keep_run", ROOT / "bench" / "keep_run.py")
    assert spec is not None and spec.loader is not None
    keep_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(keep_run)
    loaded = load_model("tiny-llama")
    hp = load_hparams(shipped_hparams("tiny-llama"))
    console = Console(quiet=True)
    whole = RunOptions(requests=str(SAMPLE), limit=4, out=tmp_path / "whole", sequential=True)
    run_edits(loaded, hp, whole, console)
    loaded = load_model("tiny-llama")
    part = RunOptions(requests=str(SAMPLE), limit=2, out=tmp_path / "part", sequential=True)
    run_edits(loaded, hp, part, console)
    assert keep_run.keep(tmp_path / "part", tmp_path / "kept") == 2
    assert not (tmp_path / "kept" / "patches.safetensors").exists()
    assert len(list((tmp_path / "kept" / "patches.d").iterdir())) == 2
    loaded = load_model("tiny-llama")
    run_edits(
        loaded, hp, RunOptions(**{**vars(part), "limit": 4}), console, resume=tmp_path / "kept"
    )
    for name in ("whole", "kept"):
        assert (tmp_path / name / "patches.safetensors").exists()
    from rrome_cli.patches import load_patches

    for a, b in zip(
        load_patches(tmp_path / "whole" / "patches.safetensors"),
        load_patches(tmp_path / "kept" / "patches.safetensors"),
        strict=True,
    ):
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
