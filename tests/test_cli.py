"""The command line as a user runs it: help, exit codes, located errors, pipelines, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from rrome_cli import run as run_module
from rrome_cli.cli import app
from rrome_cli.config import load_hparams, shipped_hparams
from rrome_cli.engine.update import Patch
from rrome_cli.files import PATCH_JOURNAL
from rrome_cli.models.loading import load_config, load_model, load_tokenizer
from rrome_cli.patches import load_patches, save_patches
from rrome_cli.requests import RequestError
from rrome_cli.run import RunOptions, run_edits, survey_requests

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "counterfact-sample.jsonl"
runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def unwrapped(text: str) -> str:
    """``text`` without whitespace: rich wraps long messages anywhere, paths included."""
    return "".join(text.split())


def test_help_lists_commands_and_real_options() -> None:
    top = run("--help")
    assert top.exit_code == 0
    for command in ("edit", "eval", "memcheck", "stats"):
        assert command in top.stdout
    edit_help = run("edit", "--help").stdout
    for option in (
        "--model",
        "--hparams",
        "--fp16",
        "--bf16",
        "--devices",
        "--out",
        "--format",
        "--limit",
        "--seed",
        "--skip-invalid",
        "--report",
        "--sequential",
        "--resume",
        "--variant",
        "--max-update-ratio",
        "--save-model",
        "--phrasings",
    ):
        assert option in edit_help, option
    assert "--max-memory" in run("memcheck", "--help").stdout
    assert "--patches" in run("eval", "--help").stdout


def test_bad_record_exits_2_naming_file_line_field(tmp_path: Path, no_model_load: None) -> None:
    """A requests file is read whole before the model loads: a bad line 2 stops the run
    before it starts, and no run directory is left behind."""
    result = run(
        "edit",
        str(DATA / "bad-requests.jsonl"),
        "--model",
        "tiny-llama",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 2
    assert "bad-requests.jsonl:2" in result.stderr
    assert "field" in result.stderr
    assert not (tmp_path / "run").exists()


def test_skip_invalid_edits_the_valid_records(tmp_path: Path) -> None:
    result = run(
        "edit",
        str(DATA / "bad-requests.jsonl"),
        "--model",
        "tiny-llama",
        "--skip-invalid",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 0, result.stderr
    lines = (tmp_path / "run" / "report.jsonl").read_text().splitlines()
    assert [json.loads(x)["source"].rsplit(":", 1)[1] for x in lines] == ["1", "8"]
    assert "bad-requests.jsonl:4" in result.stderr  # each skip is reported


def test_edit_into_a_finished_run_exits_2_and_keeps_its_report(tmp_path: Path) -> None:
    """A second run with the same --out would append to the first run's report."""
    out = tmp_path / "run"
    args = ("edit", str(SAMPLE), "--model", "tiny-llama", "--limit", "1", "--out", str(out))
    assert run(*args).exit_code == 0
    before = (out / "report.jsonl").read_text()
    result = run(*args)
    assert result.exit_code == 2
    assert "--resume" in result.stderr and str(out) in result.stderr
    assert (out / "report.jsonl").read_text() == before


def test_unknown_hparams_key_exits_2_with_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "h.yaml"
    bad.write_text("layers: [1]\nv_lrr: 0.5\n")
    result = run("edit", str(SAMPLE), "--model", "tiny-llama", "--hparams", str(bad))
    assert result.exit_code == 2
    assert "v_lrr" in result.stderr and "v_lr" in result.stderr


def test_missing_requests_file_exits_2(tmp_path: Path) -> None:
    result = run(
        "edit",
        str(tmp_path / "nope.jsonl"),
        "--model",
        "tiny-llama",
        "--out",
        str(tmp_path / "run"),
    )
    assert result.exit_code == 2
    assert "nope.jsonl" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_that_is_not_here_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("edit", str(SAMPLE), "--model", "tiny-llama", "--devices", "0", "--out", str(out))
    assert result.exit_code == 2
    assert unwrapped("--devices 0: cuda:0 is not here") in unwrapped(result.stderr)
    assert run("memcheck", "--model", "tiny-llama", "--devices", "0,1").exit_code == 0  # plans


def test_a_model_path_or_corpus_that_is_not_there_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    for flag in ("--model", "--compare"):
        args = ["eval", str(SAMPLE), "--limit", "1", flag, str(missing)]
        if flag == "--compare":
            args += ["--model", "tiny-llama"]
        result = run(*args)
        assert result.exit_code == 2, flag
        assert unwrapped(f"model {missing}: no such directory") in unwrapped(result.stderr)
    corpus = tmp_path / "corpus.txt"
    result = run("stats", "--model", "tiny-llama", "--layer", "1", "--corpus", str(corpus))
    assert result.exit_code == 2
    assert unwrapped(f"--corpus {corpus}: no such file") in unwrapped(result.stderr)


def test_pipeline_stdin_to_report_on_stdout(tmp_path: Path) -> None:
    lines = SAMPLE.read_text().splitlines()[:2]
    result = run(
        "edit",
        "-",
        "--model",
        "tiny-llama",
        "--report",
        "-",
        "--out",
        str(tmp_path / "run"),
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in result.stdout.splitlines()]  # stdout is pure JSONL
    assert [r["index"] for r in records] == [0, 1]
    assert all(r["status"] == "applied" and "post" in r for r in records)


def _strip_times(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k != "seconds"}
    record["guard"] = {k: v for k, v in record["guard"].items() if not k.startswith("seconds")}
    return record


@pytest.mark.parametrize(
    ("sequential", "protect", "killed"),
    [
        (False, 0.0, False),
        (True, 0.0, False),
        (True, 100.0, False),
        (False, 0.0, True),
        (True, 100.0, True),
    ],
)
def test_resume_after_crash_matches_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sequential: bool, protect: float, killed: bool
) -> None:
    """A resumed run gives the uninterrupted run's report and patches: independent runs keep
    the patches made before the crash; sequential ones re-apply them and re-protect their keys.
    Each edit's patches go to a file of their own as it is made (the run's patch file is not
    rewritten per edit); ``killed``: the run dies without folding them into patches.safetensors
    (SIGKILL), and the resume takes them from there."""
    from dataclasses import replace

    from rich.console import Console

    hp = replace(load_hparams(shipped_hparams("tiny-llama")), protect_weight=protect)
    console = Console(stderr=True, quiet=True)

    def options(out: Path) -> RunOptions:
        return RunOptions(requests=str(SAMPLE), limit=4, out=out, sequential=sequential)

    full_dir, _ = run_edits(load_model("tiny-llama"), hp, options(tmp_path / "full"), console)

    class Crash(Exception):
        pass

    journal = tmp_path / "cut" / PATCH_JOURNAL

    def crash_after_three(record: dict) -> None:
        assert not (tmp_path / "cut" / "patches.safetensors").exists()
        assert len(list(journal.iterdir())) == record["index"] + 1
        if record["index"] == 2:
            raise Crash

    fold = run_module.save_run_patches
    if killed:  # nothing runs on the way out
        monkeypatch.setattr(run_module, "save_run_patches", lambda state: None)
    with pytest.raises(Crash):
        run_edits(
            load_model("tiny-llama"),
            hp,
            options(tmp_path / "cut"),
            console,
            after_record=crash_after_three,
        )
    monkeypatch.setattr(run_module, "save_run_patches", fold)
    # as if killed after the third edit's patch was saved but before its report line
    cut_report = tmp_path / "cut" / "report.jsonl"
    cut_report.write_text("".join(cut_report.read_text().splitlines(keepends=True)[:2]))
    if killed:
        assert len(list(journal.iterdir())) == 3
    else:
        assert len(load_patches(tmp_path / "cut" / "patches.safetensors")) == 3
        assert not journal.exists()
    run_edits(
        load_model("tiny-llama"), hp, options(tmp_path / "cut"), console, resume=tmp_path / "cut"
    )

    def report(d: Path) -> list[dict]:
        return [_strip_times(json.loads(x)) for x in (d / "report.jsonl").read_text().splitlines()]

    assert report(tmp_path / "cut") == report(full_dir)
    assert not journal.exists()  # folded into patches.safetensors
    cut, full = (load_patches(d / "patches.safetensors") for d in (tmp_path / "cut", full_dir))
    case_ids = [str(r["case_id"]) for r in report(full_dir)]  # case 0 is named "0" too
    assert [p.request for p in cut] == [p.request for p in full] == case_ids
    for a, b in zip(cut, full, strict=True):
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)


def test_interrupt_between_patch_and_report_line_keeps_them_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) after the third edit's patch is saved but before its report line:
    patches.safetensors holds the two reported edits only, and a resume makes the third again
    and ends where the uninterrupted run does."""
    from rich.console import Console

    hp = load_hparams(shipped_hparams("tiny-llama"))
    console = Console(stderr=True, quiet=True)

    def options(out: Path) -> RunOptions:
        return RunOptions(requests=str(SAMPLE), limit=4, out=out)

    full_dir, _ = run_edits(load_model("tiny-llama"), hp, options(tmp_path / "full"), console)
    append = run_module.append_record

    def interrupted_third(report, record, stdout) -> None:  # noqa: ANN001
        if record["index"] == 2:
            assert (tmp_path / "cut" / PATCH_JOURNAL / "0000002.safetensors").exists()
            raise KeyboardInterrupt
        append(report, record, stdout)

    monkeypatch.setattr(run_module, "append_record", interrupted_third)
    with pytest.raises(KeyboardInterrupt):
        run_edits(load_model("tiny-llama"), hp, options(tmp_path / "cut"), console)
    monkeypatch.setattr(run_module, "append_record", append)
    cut_dir = tmp_path / "cut"
    lines = (cut_dir / "report.jsonl").read_text().splitlines()
    reported = [str(json.loads(x)["case_id"]) for x in lines]
    assert [p.request for p in load_patches(cut_dir / "patches.safetensors")] == reported
    assert len(reported) == 2 and not (cut_dir / PATCH_JOURNAL).exists()
    run_edits(load_model("tiny-llama"), hp, options(cut_dir), console, resume=cut_dir)
    cut, full = (load_patches(d / "patches.safetensors") for d in (cut_dir, full_dir))
    assert [p.request for p in cut] == [p.request for p in full] and len(cut) == 4
    for a, b in zip(cut, full, strict=True):
        assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)


def test_sigterm_stops_a_run_as_ctrl_c_does_keeping_its_patches(tmp_path: Path) -> None:
    """A scheduler's SIGTERM: exit 143 and the edits made so far folded into
    patches.safetensors, one per applied record of the report, no journal left."""
    lines = SAMPLE.read_text().splitlines()
    requests = tmp_path / "many.jsonl"
    requests.write_text("\n".join(lines * 20) + "\n")  # far more than run before the signal
    out, report = tmp_path / "run", tmp_path / "run" / "report.jsonl"
    edit = ["edit", str(requests), "--model", "tiny-llama", "--out", str(out)]
    cmd = [sys.executable, "-m", "rrome_cli.cli", *edit]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (report.exists() and report.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in err
    records = [json.loads(x) for x in report.read_text().splitlines()]
    assert 2 <= len(records) < len(lines) * 20
    applied = [str(r["case_id"]) for r in records if r["status"] == "applied"]
    assert applied and [p.request for p in load_patches(out / "patches.safetensors")] == applied
    assert not (out / PATCH_JOURNAL).exists()


def test_independent_run_leaves_model_unchanged(tmp_path: Path) -> None:
    from rich.console import Console

    loaded = load_model("tiny-llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    hp = load_hparams(shipped_hparams("tiny-llama"))
    run_edits(
        loaded,
        hp,
        RunOptions(requests=str(SAMPLE), limit=3, out=tmp_path / "r"),
        Console(quiet=True),
    )
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sequential_accumulates_patches_and_saves_model(tmp_path: Path) -> None:
    from rrome_cli.patches import load_patches

    out = tmp_path / "seq"
    result = run(
        "edit",
        str(SAMPLE),
        "--model",
        "tiny-llama",
        "--limit",
        "3",
        "--sequential",
        "--retrospective",
        "--save-model",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.stderr
    assert len(load_patches(out / "patches.safetensors")) == 3
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    cumulative = [r["guard"]["cumulative_ratio"] for r in records]
    assert cumulative[0] > 0 and cumulative[-1] > cumulative[0]
    assert len((out / "retrospective.jsonl").read_text().splitlines()) == 3
    assert (out / "model" / "model.safetensors").exists()
    page = (out / "report.html").read_text()
    assert "final model (retrospective) by edit" in page


def test_sequential_records_how_full_the_protected_keys_are(tmp_path: Path) -> None:
    """Each applied edit's report line says protected keys / key dimensions so far: every key
    its patch keeps (k*, the bare prompt's, those after the subject) counts once."""
    from dataclasses import replace

    from rich.console import Console

    hp = replace(load_hparams(shipped_hparams("tiny-llama")), protect_weight=3.0)
    opts = RunOptions(requests=str(SAMPLE), limit=3, out=tmp_path / "run", sequential=True)
    out, _ = run_edits(load_model("tiny-llama"), hp, opts, Console(stderr=True, quiet=True))
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    patches = load_patches(out / "patches.safetensors")
    d_in = patches[0].left.shape[0]
    held = 0
    for record, patch in zip(records, patches, strict=True):
        held += patch.keys.shape[0]
        assert record["guard"]["key_fill"] == pytest.approx(held / d_in, abs=1e-4)
    assert 0 < held < d_in
    assert json.loads((out / "summary.json").read_text())["keys_full"] is None


def test_summary_warns_once_the_protected_keys_outnumber_the_key_dimensions() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    records = [
        {"index": i, "guard": {"update_ratio": 0.01, "cumulative_ratio": 0.1, "key_fill": fill}}
        for i, fill in enumerate([0.4, 0.8, 1.2, 1.6])
    ]
    state = SimpleNamespace(baseline_entropy=None)
    console = Console(record=True, width=200)
    summary = run_module.sequential_summary(state, records, console)
    assert summary["keys_full"]["index"] == 2 and not summary["collapsed"]
    assert "from edit 2 the protected keys outnumber" in console.export_text()
    quiet = Console(record=True, width=200)
    assert run_module.sequential_summary(state, records[:2], quiet)["keys_full"] is None
    assert "protected keys" not in quiet.export_text()


def test_max_update_ratio_rejects_and_carries_on(tmp_path: Path) -> None:
    out = tmp_path / "rej"
    result = run(
        "edit",
        str(SAMPLE),
        "--model",
        "tiny-llama",
        "--limit",
        "2",
        "--max-update-ratio",
        "1e-9",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["rejected", "rejected"]
    assert "update ratio" in records[0]["reason"]


def test_apply_patches_reproduces_the_edited_model_and_revert_undoes_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_dir = tmp_path / "seq"
    args = ("--model", "tiny-llama", "--limit", "2", "--sequential", "--save-model")
    assert run("edit", str(SAMPLE), *args, "--out", str(run_dir)).exit_code == 0
    patches = str(run_dir / "patches.safetensors")
    applied = tmp_path / "applied"
    result = run("apply", patches, "--model", "tiny-llama", "--out", str(applied))
    assert result.exit_code == 0, result.stderr
    assert "independent run" not in result.stderr
    edited = load_file(str(run_dir / "model" / "model.safetensors"))
    again = load_file(str(applied / "model.safetensors"))
    assert all(torch.equal(edited[k], again[k]) for k in edited)  # bit for bit
    reverted = tmp_path / "reverted"
    result = run("apply", patches, "--model", str(applied), "--revert", "--out", str(reverted))
    assert result.exit_code == 0, result.stderr
    base = load_model("tiny-llama").model.state_dict()
    back = load_file(str(reverted / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(edited[name], base[name])
    torch.testing.assert_close(back[name], base[name], rtol=0, atol=1e-5)
    # --out never replaces what is not a checkpoint, nor a checkpoint without --overwrite
    kept = sorted(p.name for p in run_dir.iterdir())
    for target in (run_dir, run_dir / "report.jsonl", applied):
        result = run("apply", patches, "--model", "tiny-llama", "--out", str(target))
        assert result.exit_code == 2, target
        assert unwrapped(f"--out {target}") in unwrapped(result.stderr)
    assert sorted(p.name for p in run_dir.iterdir()) == kept
    assert torch.equal(load_file(str(applied / "model.safetensors"))[name], again[name])
    revert_in_place = ("--model", str(applied), "--revert", "--out", str(applied), "--overwrite")
    result = run("apply", patches, *revert_in_place)
    assert result.exit_code == 0, result.stderr
    assert torch.equal(load_file(str(applied / "model.safetensors"))[name], back[name])


def test_options_that_contradict_each_other_exit_2(tmp_path: Path) -> None:
    result = run("memcheck", "--model", "tiny-llama", "--fp16", "--bf16")
    assert result.exit_code == 2 and "choose one of --fp16 and --bf16" in result.stderr
    patches = str(tmp_path / "patches.safetensors")
    result = run("eval", str(SAMPLE), "--patches", patches, "--compare", "tiny-gpt2")
    assert result.exit_code == 2 and "choose one of --patches and --compare" in result.stderr


def test_eval_with_patches_and_compare(tmp_path: Path) -> None:
    edit_dir = tmp_path / "edit"
    base = ("--model", "tiny-llama", "--limit", "2")
    assert run("edit", str(SAMPLE), *base, "--sequential", "--out", str(edit_dir)).exit_code == 0
    patched = tmp_path / "patched"
    html = tmp_path / "report.html"
    result = run(
        "eval",
        str(SAMPLE),
        *base,
        "--patches",
        str(edit_dir / "patches.safetensors"),
        "--out",
        str(patched),
        "--html",
        str(html),
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in (patched / "report.jsonl").read_text().splitlines()]
    edited = [json.loads(x) for x in (edit_dir / "report.jsonl").read_text().splitlines()]
    # the patched base model scores the last request as the sequential run's final model did
    assert records[-1]["post"]["nll_new"] == pytest.approx(edited[-1]["post"]["nll_new"], 1e-4)
    assert records[0]["pre"]["nll_new"] == pytest.approx(edited[0]["pre"]["nll_new"], 1e-4)
    assert "<svg" in html.read_text()
    assert "independent run" not in result.stderr
    alone = tmp_path / "alone"  # an independent run's patches, applied together: a warning
    assert run("edit", str(SAMPLE), *base, "--out", str(alone)).exit_code == 0
    patches = str(alone / "patches.safetensors")
    result = run("eval", str(SAMPLE), *base, "--patches", patches, "--out", str(tmp_path / "e"))
    assert result.exit_code == 0, result.stderr
    assert "independent run" in " ".join(result.stderr.split())
    result = run("apply", patches, "--model", "tiny-llama", "--out", str(tmp_path / "ckpt"))
    assert result.exit_code == 0, result.stderr
    assert "independent run" in " ".join(result.stderr.split())
    same = tmp_path / "same"
    result = run("eval", str(SAMPLE), *base, "--compare", "tiny-llama", "--out", str(same))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in (same / "report.jsonl").read_text().splitlines()]
    assert all(r["post"]["locality"] == 1.0 and r["post"] == r["pre"] for r in records)


def test_eval_reports_say_nothing_was_edited(tmp_path: Path) -> None:
    """rrome eval measures and edits nothing: each report line says "evaluated" (it said
    "applied"), the summary counts evaluations only, and the second model's metrics are still
    summarised as "post"."""
    out, html = tmp_path / "same", tmp_path / "report.html"
    args = ("--model", "tiny-llama", "--limit", "2", "--compare", "tiny-llama")
    result = run("eval", str(SAMPLE), *args, "--out", str(out), "--html", str(html))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["evaluated", "evaluated"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"evaluated": 2}
    assert summary["metrics"]["post"]["locality"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 2}
    shown = " ".join(result.stderr.split())
    assert "2 requests: 2 evaluated" in shown and "applied" not in shown
    assert "2 requests: 2 evaluated" in html.read_text()


def test_phrasings_table_reaches_the_report(tmp_path: Path) -> None:
    """--phrasings fills a request's relation phrasings; the report records what was used."""
    table = DATA / "counterfact-phrasings.json"
    args = ("--model", "tiny-llama", "--limit", "2", "--phrasings", str(table))
    result = run("edit", str(SAMPLE), *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.stderr
    first = json.loads((tmp_path / "run" / "report.jsonl").read_text().splitlines()[0])
    assert "{} is a native speaker of" in first["request"]["phrasings"]
    assert first["status"] == "applied"
    options = json.loads((tmp_path / "run" / "run.json").read_text())["options"]
    assert options["phrasings"].endswith("counterfact-phrasings.json")


def test_bad_phrasings_table_exits_2_before_any_edit(tmp_path: Path) -> None:
    table = tmp_path / "phrasings.json"
    table.write_text('[["The capital of {} is", "no slot here"]]')
    result = run(
        "edit", str(SAMPLE), "--model", "tiny-llama", "--phrasings", str(table),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.exit_code == 2
    assert str(table) in result.stderr
    assert not (tmp_path / "run" / "report.jsonl").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('["{}", "The sky. {}", "no slot"]', "template 3 ('no slot'): needs one '{}'"),
        ('["{}",\n  "two {} {}"]', "template 2 ('two {} {}'): needs one '{}'"),
        ('["{}",\n  oops]', ":2: not valid JSON"),
        ("[]", "expected a JSON list of templates"),
    ],
)
def test_bad_templates_file_exits_2_before_the_model_loads(
    tmp_path: Path, no_model_load: None, text: str, problem: str
) -> None:
    templates = tmp_path / "templates.json"
    templates.write_text(text)
    result = run(
        "edit", str(SAMPLE), "--model", "tiny-llama", "--templates", str(templates),
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.exit_code == 2
    assert str(templates) in result.stderr and problem in " ".join(result.stderr.split())


def test_unreadable_patches_exit_2_before_the_model_loads(
    tmp_path: Path, no_model_load: None
) -> None:
    junk = tmp_path / "patches.safetensors"
    junk.write_bytes(b"not a safetensors file")
    not_ours = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(not_ours))
    for path, problem in ((junk, "cannot read patches"), (not_ours, "not an rrome patches")):
        for args in (
            ("eval", str(SAMPLE), "--model", "tiny-llama", "--patches", str(path)),
            ("apply", str(path), "--model", "tiny-llama", "--out", str(tmp_path / "ckpt")),
        ):
            result = run(*args)
            assert result.exit_code == 2, args
            assert unwrapped(f"{path}: {problem}") in unwrapped(result.stderr)


@pytest.mark.parametrize(
    ("module", "d_in", "problem"),
    [
        ("model.layers.9.mlp.down_proj", 128, "which this model does not have"),
        ("model.layers.1.mlp.down_proj", 100, "made for W of (64, 100), this model's is (64, 128)"),
    ],
)
def test_patches_of_another_model_exit_2_before_any_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, d_in: int, problem: str
) -> None:
    import rrome_cli.engine.update as update

    monkeypatch.setattr(update, "apply_update", lambda *a: pytest.fail("a patch was applied"))
    fits = Patch(1, "model.layers.1.mlp.down_proj", torch.ones(128), torch.ones(64), "float32")
    wrong = Patch(1, module, torch.ones(d_in), torch.ones(64), "float32", "case-7")
    path = tmp_path / "patches.safetensors"
    save_patches(path, [fits, wrong])
    for args in (
        ("eval", str(SAMPLE), "--model", "tiny-llama", "--patches", str(path), "--limit", "1"),
        ("apply", str(path), "--model", "tiny-llama", "--out", str(tmp_path / "ckpt")),
    ):
        result = run(*args)
        assert result.exit_code == 2, args
        message = unwrapped(result.stderr)
        assert unwrapped(f"{path}: patch 2 (request case-7) edits {module}") in message
        assert unwrapped(problem) in message
    assert not (tmp_path / "ckpt").exists()


def test_memory_plan_counts_phrasings_that_requests_bring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memcheck before an edit plans the phrasing rows whether they come from --phrasings or
    from the requests themselves; a file without any plans none."""
    from rrome_cli import cli, memcheck

    asked: list[int] = []
    real_plan = memcheck.plan
    monkeypatch.setattr(
        memcheck, "plan", lambda *a, **k: asked.append(k["phrasings"]) or real_plan(*a, **k)
    )
    own = tmp_path / "own.jsonl"
    record = json.loads(SAMPLE.read_text().splitlines()[0])
    own.write_text(json.dumps(record | {"phrasings": ["{} speaks"]}) + "\n")
    hp = load_hparams(shipped_hparams("smollm2-135m"))
    table = str(DATA / "counterfact-phrasings.json")
    tok, config = load_tokenizer("smollm2-135m"), load_config("smollm2-135m")
    for opts in (
        RunOptions(requests=str(SAMPLE)),
        RunOptions(requests=str(own)),
        RunOptions(requests=str(SAMPLE), phrasings=table),
        RunOptions(requests="-"),  # standard input cannot be read twice
        RunOptions(requests=str(DATA / "bad-requests.jsonl")),  # reported later, at its line
    ):
        survey = survey_requests(tok, config, hp, opts)
        cli.check_memory("smollm2-135m", None, "cpu", None, hp, False, survey)
    assert asked == [0, hp.max_phrasings, hp.max_phrasings, 0, 0]


def test_memory_plan_is_for_the_longest_request(tmp_path: Path) -> None:
    """memcheck before an edit plans the longest request of the file, not a typical one:
    a long prompt widens the value pass and the key pass, and the plan's working set."""
    from rrome_cli import memcheck

    hp = load_hparams(shipped_hparams("smollm2-135m"))
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:3]]
    long = dict(records[1], prompt="Long ago and far away, " * 40 + records[1]["prompt"])
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [records[0], long, records[2]]))
    tok, config = load_tokenizer("smollm2-135m"), load_config("smollm2-135m")
    shape = survey_requests(tok, config, hp, RunOptions(requests=str(path))).shape
    assert shape.to_subject > 200 > memcheck.TYPICAL.to_subject
    assert survey_requests(tok, config, hp, RunOptions(requests="-")).shape == memcheck.TYPICAL
    # under --skip-invalid a request too long for the model is skipped, and not planned for
    too_long = dict(records[1], prompt="Long ago and far away, " * 2000 + records[1]["prompt"])
    path.write_text("".join(json.dumps(r) + "\n" for r in [records[0], too_long, records[2]]))
    with pytest.raises(RequestError, match=r"requests.jsonl:2: field 'prompt'"):
        survey_requests(tok, config, hp, RunOptions(requests=str(path)))
    skipping = RunOptions(requests=str(path), skip_invalid=True)
    assert survey_requests(tok, config, hp, skipping).shape.to_subject < 200

    def edit_bytes(shape: memcheck.PromptShape) -> int:
        plan = memcheck.plan("smollm2-135m", None, "cpu", None, hp, shape=shape)
        assert plan.geometry.prefix >= shape.to_subject
        return plan.devices[0].edit

    assert edit_bytes(shape) > 2 * edit_bytes(memcheck.TYPICAL)


def test_memcheck_phrasings_option_plans_more_value_rows() -> None:
    base = ("memcheck", "--model", "smollm2-135m", "--devices", "cpu", "--json")
    plain = json.loads(run(*base).stdout)
    phrased = run(*base, "--phrasings", str(DATA / "counterfact-phrasings.json"))
    assert phrased.exit_code == 0, phrased.stderr
    value_step = json.loads(phrased.stdout)["components"]["value_step"]
    assert value_step > plain["components"]["value_step"]
