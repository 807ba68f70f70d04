"""The fault table: hostile input and damaged run directories, as a user would meet them.

Each case asserts the exit code, that the message names the file (and line and field where
there is one), and that nothing on disk was lost: the files of the directories involved hash
the same before and after (or, for a resume, what the run had done is all still there).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rrome_cli.cli import app
from rrome_cli.config import shipped_hparams
from rrome_cli.files import PATCH_JOURNAL
from rrome_cli.models.loading import CHECKPOINT_MARK
from rrome_cli.patches import load_patches, save_patches

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "counterfact-sample.jsonl"
TINY = ("--model", "tiny-llama")
runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def said(result) -> str:  # noqa: ANN001
    """The command's standard error without whitespace: rich wraps long messages anywhere."""
    return "".join(result.stderr.split())


def names(text: str) -> str:
    return "".join(text.split())


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256 of its bytes), folders as ``/``."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished three-edit run of tiny-llama (made once; tests work on copies)."""
    out = tmp_path_factory.mktemp("made") / "run"
    result = run("edit", str(SAMPLE), *TINY, "--limit", "3", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-edit run with ``--save-model`` (made once; tests work on copies)."""
    out = tmp_path_factory.mktemp("made") / "run"
    args = ("edit", str(SAMPLE), *TINY, "--limit", "1", "--save-model", "--out", str(out))
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def a_run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def a_saved_run(saved_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "saved"
    shutil.copytree(saved_run, copy)
    return copy


def refused(args: list[str], *watched: Path, expect: tuple[str, ...], code: int = 2) -> None:
    """``rrome args`` exits ``code``, its message holds each of ``expect``, and every watched
    path is bit for bit as it was (or still absent)."""
    before = [tree(p) for p in watched]
    result = run(*args)
    assert result.exit_code == code, result.stderr or result.stdout
    for text in expect:
        assert names(text) in said(result), (text, result.stderr)
    assert [tree(p) for p in watched] == before


# --------------------------------------------------------------------------------- data loss


def test_eval_into_a_run_directory_is_refused(a_run: Path) -> None:
    """It replaced the run's report.jsonl (3 lines became 1) and summary.json."""
    args = ["eval", str(SAMPLE), *TINY, "--limit", "1", "--out", str(a_run)]
    refused(args, a_run, expect=(str(a_run), "report.jsonl", "choose another --out"))


def test_eval_into_an_earlier_evaluation_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(SAMPLE), *TINY, "--limit", "1", "--out", str(out)]
    assert run(*args).exit_code == 0
    refused(args, out, expect=(str(out), "report.jsonl"))


@pytest.mark.parametrize("held", ["model", PATCH_JOURNAL])
def test_a_new_run_never_replaces_a_model_or_journal_folder_it_did_not_make(
    tmp_path: Path, no_model_load: None, held: str
) -> None:
    """``--save-model`` deleted DIR/model whatever it held; patches.d went the same way."""
    out = tmp_path / "out"
    (out / held).mkdir(parents=True)
    (out / held / "weights.bin").write_bytes(b"the user's own")
    args = ["edit", str(SAMPLE), *TINY, "--limit", "1", "--save-model", "--out", str(out)]
    refused(args, out, expect=(str(out), held))


def test_resume_never_replaces_a_model_folder_rrome_did_not_write(
    a_saved_run: Path, no_model_load: None
) -> None:
    out = a_saved_run
    assert (out / "model" / CHECKPOINT_MARK).is_file()
    shutil.rmtree(out / "model")
    (out / "model").mkdir()
    (out / "model" / "notes.txt").write_text("not a checkpoint of rrome's")
    refused(["edit", "--resume", str(out)], out, expect=(str(out / "model"), "rrome wrote"))


def test_resume_replaces_the_model_folder_it_wrote_itself(a_saved_run: Path) -> None:
    out = a_saved_run
    result = run("edit", "--resume", str(out))
    assert result.exit_code == 0, result.stderr
    assert (out / "model" / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".model-")]


def test_resume_without_its_patches_is_refused(a_run: Path, no_model_load: None) -> None:
    """It exited 0 and wrote a patch file without patches while the report said 3 applied."""
    (a_run / "patches.safetensors").unlink()
    refused(
        ["edit", "--resume", str(a_run)],
        a_run,
        expect=(str(a_run / "patches.safetensors"), "is missing", "3 applied"),
    )


def test_resume_with_a_patch_file_short_of_the_report_is_refused(
    a_run: Path, no_model_load: None
) -> None:
    path = a_run / "patches.safetensors"
    save_patches(path, load_patches(path)[:1])
    refused(["edit", "--resume", str(a_run)], a_run, expect=(str(path), "holds 1 of the 3"))


def test_resume_rebuilds_the_patch_file_from_a_whole_journal(a_run: Path) -> None:
    """A run killed outright keeps its edits in patches.d; the journal holding every edit is
    enough to rebuild patches.safetensors, the same patches in the same order."""
    path = a_run / "patches.safetensors"
    patches = load_patches(path)
    records = [json.loads(x) for x in (a_run / "report.jsonl").read_text().splitlines()]
    for record, patch in zip(records, patches, strict=True):
        save_patches(a_run / PATCH_JOURNAL / f"{record['index']:07d}.safetensors", [patch])
    path.unlink()
    result = run("edit", "--resume", str(a_run))
    assert result.exit_code == 0, result.stderr
    again = load_patches(path)
    assert [p.request for p in again] == [p.request for p in patches]
    pairs = zip(again, patches, strict=True)
    assert all(a.left.equal(b.left) and a.right.equal(b.right) for a, b in pairs)
    assert not (a_run / PATCH_JOURNAL).exists()


def test_a_resume_keeps_what_it_finds_in_the_journal_folder_that_is_not_its_own(
    a_run: Path,
) -> None:
    (a_run / PATCH_JOURNAL).mkdir()
    (a_run / PATCH_JOURNAL / "mine.txt").write_text("kept")
    assert run("edit", "--resume", str(a_run)).exit_code == 0
    assert (a_run / PATCH_JOURNAL / "mine.txt").read_text() == "kept"


def test_resume_without_its_report_is_refused(a_run: Path, no_model_load: None) -> None:
    (a_run / "report.jsonl").unlink()
    refused(["edit", "--resume", str(a_run)], a_run, expect=(str(a_run / "report.jsonl"),))


# ------------------------------------------------------------- requests: refused before the load

GOOD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Lyon"}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (json.dumps(GOOD) + '\n{"prompt": "The capital of Japan is"\n', 2, "<record>"),
        (json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9 {}"}\n', 2, "<record>"),
        (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "target_new": 42}), 2, "target_new"),
        (json.dumps({**GOOD, "subject": "Spain"}), 1, "subject"),
        (json.dumps(GOOD) + "\n[1, 2]\n", 2, "<record>"),
        ("[" + json.dumps(GOOD) + ",\n" + json.dumps({"prompt": "x"}) + "]", 2, "subject"),
        ("[" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD), 2, "<record>"),  # torn array
    ],
    ids=["torn-line", "not-utf8", "wrong-type", "subject-absent", "not-object", "array-record",
         "torn-array"],
)  # fmt: skip
def test_a_bad_record_is_refused_before_the_model_loads_and_leaves_no_run(
    tmp_path: Path, no_model_load: None, text: str | bytes, line: int, field: str
) -> None:
    """Today's bad line 2 came after the model had loaded (minutes on a 7B), and left a run
    directory behind."""
    path = write(tmp_path / "requests.jsonl", text)
    out = tmp_path / "run"
    where = f"{path}:{line}"
    field_named = f"field '{field}'"
    refused(["edit", str(path), *TINY, "--out", str(out)], path, out, expect=(where, field_named))
    assert not out.exists()


@pytest.mark.parametrize("text", ["", "\n  \n\n", "[]", "[\n]\n"])
def test_an_input_without_requests_is_refused(
    tmp_path: Path, no_model_load: None, text: str
) -> None:
    """A filter that matched nothing, or a smoke run that edits nothing, must not pass."""
    path = write(tmp_path / "requests.jsonl", text)
    out = tmp_path / "run"
    for command in ("edit", "eval"):
        args = [command, str(path), *TINY, "--out", str(out)]
        refused(args, path, expect=(f"no requests in {path}",))
        assert not out.exists()


def test_a_file_of_invalid_records_only_is_refused_with_skip_invalid(
    tmp_path: Path, no_model_load: None
) -> None:
    path = write(tmp_path / "requests.jsonl", '{"prompt": 1}\n{"prompt": "x", "subject": 2}\n')
    args = ["edit", str(path), *TINY, "--skip-invalid", "--out", str(tmp_path / "run")]
    refused(args, path, expect=(f"no valid (2 skipped) requests in {path}",))


@pytest.mark.parametrize("text", ["", "\n", "  \n\n\t\n"])
def test_empty_standard_input_is_refused_before_the_model_loads(
    text: str, no_model_load: None
) -> None:
    result = run("edit", "-", *TINY, input=text)
    assert result.exit_code == 2
    assert "no requests in <stdin>" in result.stderr


@pytest.mark.parametrize("text", [b"", b"\n \n\n"])
def test_empty_standard_input_from_a_pipe_is_refused(tmp_path: Path, text: bytes) -> None:
    """Through a real pipe, where the lines read ahead must be given back to the run."""
    cmd = [sys.executable, "-m", "rrome_cli.cli", "edit", "-", *TINY, "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, input=text, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert b"no requests in <stdin>" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_standard_input_after_blank_lines_keeps_every_record_and_its_line(
    tmp_path: Path,
) -> None:
    """The blank lines read ahead (to refuse blank-only input early) are replayed: the
    record after them is edited and a bad one is still named at its own line."""
    out = tmp_path / "run"
    text = "\n  \n" + json.dumps(GOOD) + '\n{"prompt": "no subject here"}\n'
    result = run("edit", "-", *TINY, "--out", str(out), input=text)
    assert result.exit_code == 2
    assert names("<stdin>:4: field 'subject'") in said(result)
    assert len((out / "report.jsonl").read_text().splitlines()) == 1


def test_standard_input_streams_and_keeps_the_records_before_a_bad_one(tmp_path: Path) -> None:
    """Standard input is not read whole first: records are edited as they come, and a bad
    one stops the run at its line with the earlier ones reported."""
    out = tmp_path / "run"
    text = json.dumps(GOOD) + '\n{"prompt": "no subject here"}\n'
    result = run("edit", "-", *TINY, "--out", str(out), input=text)
    assert result.exit_code == 2
    assert names("<stdin>:2: field 'subject'") in said(result)
    assert len((out / "report.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------------------------ hyperparameters at load


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("v_lr: -1", "v_lr must be greater than 0"),
        ("v_lr: 0", "v_lr must be greater than 0"),
        ("v_lr: .nan", "v_lr must be greater than 0"),
        ("kl_factor: -0.5", "kl_factor must be 0 or more"),
        ("v_stop_prob: 1.5", "v_stop_prob must be in (0, 1]"),
        ("v_num_grad_steps: 2.5", "v_num_grad_steps must be a whole number"),
        ("mom2_n_samples: 0", "mom2_n_samples must be a whole number, 1 or more"),
        ("clamp_norm_factor: 0", "clamp_norm_factor must be greater than 0"),
        ("context_template_length_params: [[0, 5]]", "context_template_length_params must be"),
        ("layers: [-1]", "layers must be a list of layer numbers"),
        ("layers: 5", "layers must be a list of layer numbers"),
        ("layers: [1, 1]", "layers names a layer twice"),
        ("layers: [999]", "layers [999] are outside the model, which has 4 layers"),
    ],
)
def test_a_bad_hyperparameter_is_refused_at_load_with_its_line(
    tmp_path: Path, no_model_load: None, line: str, problem: str
) -> None:
    hparams = write(tmp_path / "h.yaml", f"mom2_adjustment: false\n{line}\n")
    out = tmp_path / "run"
    key = line.split(":")[0]
    if key != "layers":
        hparams.write_text(f"layers: [1]\n{hparams.read_text()}")
    at = f"{hparams}:{2 if key == 'layers' else 3}"
    args = ["edit", str(SAMPLE), *TINY, "--hparams", str(hparams), "--out", str(out)]
    refused(args, hparams, expect=(at, problem))
    assert not out.exists()


# ---------------------------------------------------------------------------------- no-op edits


def test_an_edit_that_changes_nothing_is_a_no_op_not_applied(tmp_path: Path) -> None:
    """A zero update (here the prompts give the target with v_stop_prob before the first step)
    was reported as applied; it is "no-op", keeps no patch and leaves post metrics out."""
    hparams = write(tmp_path / "h.yaml", shipped_hparams("tiny-llama").read_text())
    hparams.write_text(hparams.read_text() + "v_stop: target\nv_stop_prob: 1e-9\n")
    out = tmp_path / "run"
    args = ["edit", str(SAMPLE), *TINY, "--limit", "2", "--hparams", str(hparams)]
    result = run(*args, "--out", str(out))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in (out / "report.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["no-op", "no-op"]
    assert all("update is zero" in r["reason"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["no-op"] == 2 and summary["counts"]["applied"] == 0
    assert summary["metrics"]["post"] == {}
    assert load_patches(out / "patches.safetensors") == []
    assert "2 no-op" in result.stderr


def test_an_edit_whose_target_did_not_move_is_a_no_op() -> None:
    import torch

    from rrome_cli.engine.edit import EditResult, LayerEdit
    from rrome_cli.engine.update import Patch
    from rrome_cli.run import no_op_reason

    patch = Patch(1, "m", torch.ones(2), torch.ones(2), "torch.float32")
    layer = LayerEdit(1, "m", patch, 1.0, 1.0, 0.3, 1.0, 0.1, 0.5, 3, {})
    result = EditResult("applied", [layer])
    assert "did not move" in no_op_reason(result, {"nll_new": 4.0}, {"nll_new": 4.0})
    assert no_op_reason(result, {"nll_new": 4.0}, {"nll_new": 3.0}) == ""


# ----------------------------------------------------------------------------------- model files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama saved as a local checkpoint (made once; tests work on copies)."""
    from rrome_cli.models.loading import load_model, save_model_atomic

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model_atomic(load_model("tiny-llama"), path)
    return path


def test_a_truncated_checkpoint_exits_2_naming_the_file(checkpoint: Path, tmp_path: Path) -> None:
    """It was an internal SafetensorError, exit 1."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    hparams = str(shipped_hparams("tiny-llama"))
    for args in (
        ["edit", str(SAMPLE), "--hparams", hparams, "--out", str(out)],
        ["eval", str(SAMPLE), "--out", str(out)],
    ):
        refused([*args, "--model", str(broken)], broken, expect=(str(weights), "truncated"))
        assert not out.exists()


@pytest.mark.parametrize("command", ["edit", "eval", "memcheck"])
def test_a_local_model_path_that_is_not_there_says_so(tmp_path: Path, command: str) -> None:
    """It got the hub's "Repo id must be in the form ..." message."""
    missing = tmp_path / "no" / "model"
    args = [command, str(SAMPLE)] if command != "memcheck" else [command]
    refused([*args, "--model", str(missing)], tmp_path, expect=(f"{missing}: no such directory",))


# ------------------------------------------------------------------ longer than the model's context

LONG = {**GOOD, "prompt": "In a long story " + "and then " * 300 + "the capital of France is"}


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (LONG, "prompt"),
        ({**GOOD, "rephrase_prompt": "So " * 400 + "France's capital is"}, "rephrase_prompt[0]"),
        (
            {**GOOD, "locality_prompt": "x " * 400, "locality_ground_truth": "y"},
            "locality[0]",
        ),
    ],
    ids=["prompt", "rephrase", "locality"],
)
def test_a_request_longer_than_the_context_exits_2_before_any_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: dict, field: str
) -> None:
    """On a 256-position model a 600-word prompt was an internal error; on a 7B model such
    prompts asked for gigabytes. The whole file is checked before the first edit."""
    import rrome_cli.run as run_module

    monkeypatch.setattr(run_module, "edit", lambda *a, **k: pytest.fail("an edit ran"))
    path = write(tmp_path / "requests.jsonl", json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "run"
    for command in ("edit", "eval"):
        args = [command, str(path), *TINY, "--out", str(out)]
        refused(args, path, expect=(f"{path}:2", f"field '{field}'", "at most 256"))
        assert not out.exists()


def test_a_request_longer_than_the_context_is_refused_before_memcheck_and_the_load(
    tmp_path: Path, no_model_load: None
) -> None:
    """On SmolLM2 (8,192 positions) a 10,000-word prompt is named as bad input (exit 2),
    before memcheck (which plans the longest request and would say it does not fit) and
    before the weights load."""
    record = {**GOOD, "prompt": "Long ago, " * 5000 + GOOD["prompt"]}
    path = write(tmp_path / "requests.jsonl", json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    args = ["edit", str(path), "--model", "smollm2-135m", "--devices", "cpu"]
    refused([*args, "--out", str(tmp_path / "run")], path, expect=(f"{path}:2", "field 'prompt'"))
    assert not (tmp_path / "run").exists()


def test_a_long_request_on_standard_input_stops_the_run_at_its_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    text = json.dumps(GOOD) + "\n" + json.dumps(LONG) + "\n"
    result = run("edit", "-", *TINY, "--out", str(out), input=text)
    assert result.exit_code == 2
    assert names("<stdin>:2: field 'prompt'") in said(result)
    assert len((out / "report.jsonl").read_text().splitlines()) == 1
    skipping = run("edit", "-", *TINY, "--skip-invalid", "--out", str(tmp_path / "s"), input=text)
    assert skipping.exit_code == 0, skipping.stderr
    assert names("skipped: <stdin>:2") in said(skipping)


# --------------------------------------------------------------------------- statistics cache


def test_a_checkpoint_rewritten_in_place_gets_its_own_statistics(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key held the weight files' names and sizes only: a checkpoint rewritten in place
    (same shapes, same size) reused the old C. Now it holds their bytes' digest, computed once
    per (path, size, mtime)."""
    import torch
    from safetensors.torch import load_file, save_file

    from rrome_cli.engine import stats

    ckpt, stats_dir = tmp_path / "ckpt", tmp_path / "stats"
    shutil.copytree(checkpoint, ckpt)
    before = stats.model_identity(str(ckpt), None, stats_dir)
    assert (stats_dir / stats.DIGESTS_FILE).is_file()
    monkeypatch.setattr(stats, "_file_digest", lambda path: pytest.fail(f"{path} hashed again"))
    assert stats.model_identity(str(ckpt), None, stats_dir) == before  # remembered
    monkeypatch.undo()
    weights = ckpt / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    size = weights.stat().st_size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert stats.model_identity(str(ckpt), None, stats_dir) != before


def test_run_json_records_what_c_was_computed_from(checkpoint: Path, tmp_path: Path) -> None:
    text = shipped_hparams("tiny-llama").read_text()
    text = text.replace("mom2_adjustment: false", "mom2_adjustment: true")
    text = text.replace("mom2_n_samples: 2000", "mom2_n_samples: 300")
    hparams = write(tmp_path / "h.yaml", text)
    out, stats_dir = tmp_path / "run", tmp_path / "stats"
    args = ["edit", str(SAMPLE), "--model", str(checkpoint), "--hparams", str(hparams)]
    result = run(*args, "--limit", "1", "--stats-dir", str(stats_dir), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    [source] = json.loads((out / "run.json").read_text())["covariance_from"]
    assert source["layer"] == "1" and source["model"].startswith("local:")
    assert source["tokens"] == "300" and Path(source["file"]).parent == stats_dir


# ------------------------------------------------- cases that held already, kept as the table


def test_an_unknown_format_is_a_usage_error(tmp_path: Path, no_model_load: None) -> None:
    """It was an internal ValueError (exit 1)."""
    for command in ("edit", "eval"):
        args = [command, str(SAMPLE), *TINY, "--format", "foo", "--out", str(tmp_path / "r")]
        refused(args, tmp_path, expect=("--format must be one of", "'foo'"))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("layers: [1]\nv_lrr: 0.5\n", ":2: unknown key 'v_lrr'; did you mean 'v_lr'?"),
        ("layers: [1]\nv_lr: fast\n", ":2: v_lr must be a number"),
        ("layers: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
    ],
)
def test_a_malformed_hparams_file_exits_2(
    tmp_path: Path, no_model_load: None, text: str, problem: str
) -> None:
    hparams = write(tmp_path / "h.yaml", text)
    args = ["edit", str(SAMPLE), *TINY, "--hparams", str(hparams), "--out", str(tmp_path / "r")]
    refused(args, hparams, expect=(f"{hparams}", problem))
    assert not (tmp_path / "r").exists()


def test_a_truncated_patch_file_exits_2_before_the_model_loads(
    a_run: Path, no_model_load: None, tmp_path: Path
) -> None:
    path = a_run / "patches.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    expect = (str(path), "cannot read patches")
    refused(["eval", str(SAMPLE), *TINY, "--patches", str(path)], a_run, expect=expect)
    refused(["apply", str(path), *TINY, "--out", str(tmp_path / "ck")], a_run, expect=expect)
    refused(["edit", "--resume", str(a_run)], a_run, expect=expect)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("damage", ["missing", "not-json", "not-a-run"])
def test_resume_of_a_directory_without_a_readable_run_json_exits_2(
    a_run: Path, no_model_load: None, damage: str
) -> None:
    run_json = a_run / "run.json"
    if damage == "missing":
        run_json.unlink()
    else:
        run_json.write_text("{oops" if damage == "not-json" else "[1, 2]")
    refused(["edit", "--resume", str(a_run)], a_run, expect=(str(run_json),))


def test_resume_drops_a_torn_last_report_line_and_makes_that_edit_again(a_run: Path) -> None:
    """A run killed while writing a report line: the line is dropped, the edit made again,
    every request once and one patch per applied edit."""
    report = a_run / "report.jsonl"
    lines = report.read_text().splitlines(keepends=True)
    report.write_text("".join(lines[:2]) + lines[2][:40])
    result = run("edit", "--resume", str(a_run))
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in report.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    applied = [str(r["case_id"]) for r in records if r["status"] == "applied"]
    assert [p.request for p in load_patches(a_run / "patches.safetensors")] == applied


def test_a_finished_run_is_never_appended_to(a_run: Path, no_model_load: None) -> None:
    args = ["edit", str(SAMPLE), *TINY, "--limit", "1", "--out", str(a_run)]
    refused(args, a_run, expect=(str(a_run), "report.jsonl", f"--resume {a_run}"))


def test_apply_never_replaces_what_is_not_a_checkpoint(a_run: Path, tmp_path: Path) -> None:
    patches = str(a_run / "patches.safetensors")
    for target in (a_run, a_run / "report.jsonl"):
        args = ["apply", patches, *TINY, "--out", str(target)]
        refused(args, a_run, expect=(f"--out {target}", "not a checkpoint"))


def test_an_unreadable_phrasings_or_templates_file_exits_2(
    tmp_path: Path, no_model_load: None
) -> None:
    bad = write(tmp_path / "bad.json", '[["{} is", \n oops]]')
    out = tmp_path / "r"
    for option in ("--phrasings", "--templates"):
        args = ["edit", str(SAMPLE), *TINY, option, str(bad), "--out", str(out)]
        refused(args, bad, expect=(f"{bad}:2", "not valid JSON"))
        assert not out.exists()


def test_a_missing_requests_file_exits_2(tmp_path: Path, no_model_load: None) -> None:
    missing = tmp_path / "nope.jsonl"
    for command in ("edit", "eval"):
        args = [command, str(missing), *TINY, "--out", str(tmp_path / "r")]
        refused(args, tmp_path, expect=(str(missing), "cannot read"))
