"""CI's quality smoke: real edits through ``rrome edit`` on the embedded SmolLM2 (``make setup``
always caches it), so a regression in edit quality fails the build. The floors sit under what
the shipped recipe measures (docs/results.md) so that only a real regression trips them.

The tiny random fixtures carry no quality signal: their logits are nearly flat, and an edit
moves the target's NLL by a few hundredths either way (measured); the exact algebra tests in
test_engine.py guard them instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rrome_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "counterfact-sample.jsonl"


def edit_run(tmp_path: Path, *args: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["edit", str(SAMPLE), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.slow
def test_smollm2_shipped_recipe_rewrites_counterfact(tmp_path: Path) -> None:
    summary, records = edit_run(tmp_path, "--limit", "5")
    assert [r["status"] for r in records] == ["applied"] * 5
    pre, post = summary["metrics"]["pre"], summary["metrics"]["post"]
    assert pre["rewrite_acc"]["mean"] <= 0.2  # the facts really were new to the model
    assert post["rewrite_acc"]["mean"] >= 0.9
    assert post["es"]["mean"] >= 0.9
    assert post["locality"]["mean"] >= 0.9
    assert post["rephrase_acc"]["mean"] >= pre["rephrase_acc"]["mean"]
