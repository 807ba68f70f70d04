"""Key statistics: C = (1/T) sum k k^T of the rewrite module's input, cached and resumable."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rrome_cli.engine import stats
from rrome_cli.engine.stats import CorpusError, StatsCacheWarning, second_moment
from rrome_cli.models.families import ModuleNames, get_module, module_names
from rrome_cli.models.tiny import tiny_model

LAYER = 1
MAX_LEN = 64


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """The first Wikipedia summaries of the shipped corpus: real text, a few thousand tokens."""
    with stats.default_corpus_path().open(encoding="utf-8") as fh:
        return [next(fh).rstrip("\n") for _ in range(8)]


@pytest.fixture
def corpus(tmp_path: Path, documents: list[str]) -> Path:
    path = tmp_path / "corpus.txt"
    # A blank line between documents: it must be skipped, not counted as a document.
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama() -> tuple:
    model, tok = tiny_model("llama")
    return model, tok, module_names(type(model).__name__)


def run(model, tok, names: ModuleNames, corpus: Path, stats_dir: Path, **kwargs):
    options = dict(
        model_id="tiny-llama",
        corpus=str(corpus),
        tokens=1500,
        max_len=MAX_LEN,
        batch_tokens=256,
        stats_dir=stats_dir,
        progress=False,
    )
    options.update(kwargs)
    return second_moment(model, tok, names, LAYER, **options)


@contextmanager
def count_forwards(model, names: ModuleNames) -> Iterator[list[int]]:
    """Counts forwards that reach layer 0 (i.e. every model call the stats pass makes)."""
    calls = [0]

    def hook(*_args) -> None:
        calls[0] += 1

    handle = get_module(model, names.layer(0)).register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def reference_rows(tok, documents: list[str], budget: int) -> list[list[int]]:
    """Rows as specified: each document's ids (with the tokenizer's special tokens) cut into
    rows of MAX_LEN, in order, the last one shortened so exactly ``budget`` ids remain."""
    rows, left = [], budget
    for text in documents:
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids), MAX_LEN):
            row = ids[start : start + MAX_LEN][:left]
            rows.append(row)
            left -= len(row)
            if left == 0:
                return rows
    raise AssertionError("corpus too small for the test budget")


def swiglu_keys(model, names: ModuleNames, row: list[int]) -> torch.Tensor:
    """k = act(gate(x)) * up(x) computed by hand in float64 from the MLP input x, one
    unpadded row through a plain full forward."""
    mlp = get_module(model, names.mlp(LAYER))
    inputs: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([row]))
    handle.remove()
    x = inputs[0][0].double()
    gate = x @ mlp.gate_proj.weight.double().T
    up = x @ mlp.up_proj.weight.double().T
    return mlp.act_fn(gate) * up


def hooked_keys(model, names: ModuleNames, row: list[int]) -> torch.Tensor:
    """The rewrite module's input from a plain full forward of one unpadded row."""
    keys: list[torch.Tensor] = []
    rewrite = get_module(model, names.rewrite(LAYER))
    handle = rewrite.register_forward_pre_hook(lambda _m, args: keys.append(args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([row]))
    handle.remove()
    return keys[0][0].double()


def test_matches_float64_reference_and_budget(llama, corpus, documents, tmp_path) -> None:
    model, tok, names = llama
    budget = 1337
    rows = reference_rows(tok, documents, budget)
    assert len(rows[-1]) not in (0, MAX_LEN)  # the budget cuts a row: truncation is exercised
    keys = torch.cat([swiglu_keys(model, names, row) for row in rows])
    assert keys.shape[0] == budget
    expected = keys.T @ keys / budget

    result = run(model, tok, names, corpus, tmp_path, tokens=budget)

    assert result.tokens == budget and result.metadata["tokens"] == str(budget)
    assert result.mom2.dtype == torch.float32 and result.mom2.device.type == "cpu"
    torch.testing.assert_close(result.mom2.double(), expected, rtol=1e-5, atol=1e-7)
    # The budget is part of the key: one token more is another file and another C.
    more = run(model, tok, names, corpus, tmp_path, tokens=budget + 1)
    assert more.path != result.path and not torch.equal(more.mom2, result.mom2)


@pytest.mark.parametrize("family", ["gpt2", "gpt-neox"])
def test_other_families_match_hooked_reference(family, corpus, documents, tmp_path) -> None:
    model, tok = tiny_model(family)
    names = module_names(type(model).__name__)
    rows = reference_rows(tok, documents, 700)
    keys = torch.cat([hooked_keys(model, names, row) for row in rows])
    result = run(model, tok, names, corpus, tmp_path, tokens=700, model_id=f"tiny-{family}")
    torch.testing.assert_close(result.mom2.double(), keys.T @ keys / 700, rtol=1e-5, atol=1e-7)


def test_padding_and_batch_size_do_not_change_c(llama, corpus, tmp_path, monkeypatch) -> None:
    model, tok, names = llama
    small = run(model, tok, names, corpus, tmp_path / "a", batch_tokens=MAX_LEN)
    large = run(model, tok, names, corpus, tmp_path / "b", batch_tokens=1024)
    torch.testing.assert_close(small.mom2, large.mom2, rtol=1e-5, atol=1e-7)

    real_pad = stats.right_padded

    def extra_padding(rows, _pad_id, device):
        # 9 more padded positions per row, padded with a real token id, not the pad token.
        ids, mask = real_pad([r + [7] * 9 for r in rows], 5, device)
        for i, row in enumerate(rows):
            mask[i, len(row) :] = 0
        return ids, mask

    monkeypatch.setattr(stats, "right_padded", extra_padding)
    padded = run(model, tok, names, corpus, tmp_path / "c", batch_tokens=1024)
    torch.testing.assert_close(padded.mom2, large.mom2, rtol=1e-5, atol=1e-7)


def test_batches_are_bounded_and_keep_order() -> None:
    rows = [[1] * n for n in (5, 3, 8, 8, 2, 7, 1)]
    batches = list(stats.token_batches(rows, batch_tokens=16))
    assert [r for b in batches for r in b] == rows
    assert all(len(b) * max(map(len, b)) <= 16 for b in batches)
    assert len(batches) > 1


def test_budget_larger_than_corpus_is_an_error(llama, corpus, tmp_path) -> None:
    model, tok, names = llama
    with pytest.raises(CorpusError, match="only .* tokens"):
        run(model, tok, names, corpus, tmp_path, tokens=10**6)


def test_cache_hit_runs_no_forward(llama, corpus, tmp_path, umask_022) -> None:
    model, tok, names = llama
    with count_forwards(model, names) as calls:
        first = run(model, tok, names, corpus, tmp_path)
        computed = calls[0]
        second = run(model, tok, names, corpus, tmp_path)
    assert computed > 0 and calls[0] == computed
    assert first.path is not None and first.path.exists() and second.path == first.path
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o644  # a shared cache: group-readable
    assert torch.equal(first.mom2, second.mom2)
    assert not list(tmp_path.glob("*.partial.safetensors")) and not list(tmp_path.glob(".*tmp"))
    with safe_open(str(first.path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["module"] == names.rewrite(LAYER)
    assert meta["corpus_hash"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["tokens"] == "1500" and meta["max_len"] == str(MAX_LEN)
    assert meta["dtype"] == "float32" and meta["model"] == "tiny-llama"


def test_cache_hit_names_the_corpus_given_now(llama, corpus, tmp_path) -> None:
    """The same bytes elsewhere (another checkout, a copy) hit the cache; the run's provenance
    names the file it was given, not the one the cache was first made from."""
    model, tok, names = llama
    first = run(model, tok, names, corpus, tmp_path / "stats")
    copy = tmp_path / "elsewhere" / corpus.name
    copy.parent.mkdir()
    copy.write_bytes(corpus.read_bytes())
    with count_forwards(model, names) as calls:
        second = run(model, tok, names, copy, tmp_path / "stats")
    assert calls[0] == 0 and second.path == first.path
    assert first.source == str(corpus) and second.source == str(copy)
    assert second.metadata["corpus"] == str(corpus)  # the file keeps where it was made from


def test_changed_corpus_is_a_different_cache_entry(llama, corpus, tmp_path) -> None:
    model, tok, names = llama
    first = run(model, tok, names, corpus, tmp_path)
    corpus.write_text(corpus.read_text()[::-1], encoding="utf-8")
    with count_forwards(model, names) as calls:
        second = run(model, tok, names, corpus, tmp_path)
    assert calls[0] > 0 and second.path != first.path


def test_metadata_mismatch_recomputes_with_warning(llama, corpus, tmp_path) -> None:
    model, tok, names = llama
    good = run(model, tok, names, corpus, tmp_path)
    with safe_open(str(good.path), framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file({"mom2": good.mom2 * 2}, str(good.path), metadata={**meta, "max_len": "999"})
    with count_forwards(model, names) as calls, pytest.warns(StatsCacheWarning, match="max_len"):
        again = run(model, tok, names, corpus, tmp_path)
    assert calls[0] > 0 and torch.equal(again.mom2, good.mom2)
    assert stats.load_cached(good.path, {k: meta[k] for k in stats.KEY_FIELDS}) is not None


def test_corrupt_file_recomputes_with_warning(llama, corpus, tmp_path) -> None:
    model, tok, names = llama
    good = run(model, tok, names, corpus, tmp_path)
    good.path.write_bytes(good.path.read_bytes()[:100])
    with count_forwards(model, names) as calls, pytest.warns(StatsCacheWarning, match="unread"):
        again = run(model, tok, names, corpus, tmp_path)
    assert calls[0] > 0 and torch.equal(again.mom2, good.mom2)


def test_resume_after_interruption_equals_uninterrupted(llama, corpus, tmp_path) -> None:
    model, tok, names = llama
    options = dict(batch_tokens=MAX_LEN, checkpoint_every=300)
    with count_forwards(model, names) as calls:
        whole = run(model, tok, names, corpus, tmp_path / "whole", **options)
    total_forwards = calls[0]

    class Interrupted(Exception):
        pass

    def interrupt(*_args) -> None:
        calls[0] += 1
        if calls[0] == total_forwards // 2:
            raise Interrupted

    calls = [0]
    block = get_module(model, names.layer(LAYER))
    handle = block.register_forward_pre_hook(interrupt)
    with pytest.raises(Interrupted):
        run(model, tok, names, corpus, tmp_path / "resumed", **options)
    handle.remove()
    partials = list((tmp_path / "resumed").glob("*.partial.safetensors"))
    assert len(partials) == 1
    with safe_open(str(partials[0]), framework="pt") as fh:
        done = int(fh.metadata()["next_batch"])
    assert 0 < done < total_forwards // 2

    with count_forwards(model, names) as calls:
        resumed = run(model, tok, names, corpus, tmp_path / "resumed", **options)
    assert calls[0] == total_forwards - done  # only the batches after the checkpoint ran
    assert torch.equal(resumed.mom2, whole.mom2)
    assert not list((tmp_path / "resumed").glob("*.partial.safetensors"))


def test_jsonl_corpus_gives_same_c_and_names_missing_field(
    llama, corpus, documents, tmp_path
) -> None:
    model, tok, names = llama
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents))
    )
    from_text = run(model, tok, names, corpus, tmp_path / "t")
    from_jsonl = run(model, tok, names, jsonl, tmp_path / "j")
    assert from_jsonl.source == str(jsonl)
    torch.testing.assert_close(from_jsonl.mom2, from_text.mom2, rtol=0, atol=0)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl: record 1 has no 'text' field"):
        run(model, tok, names, bad, tmp_path / "b")


def test_default_corpus_ships_with_the_package() -> None:
    corpus = stats.open_corpus(None)
    assert Path(corpus.source) == stats.default_corpus_path()
    first = next(corpus.documents())
    assert first.startswith("20th-century classical music")


def test_two_gloo_processes_equal_one(corpus, tmp_path) -> None:
    model, tok = tiny_model("llama")
    names = module_names(type(model).__name__)
    single = run(model, tok, names, corpus, tmp_path / "single", batch_tokens=MAX_LEN)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rrome_cli.cli",
        "stats",
        "--model",
        "tiny-llama",
        "--layer",
        str(LAYER),
        "--corpus",
        str(corpus),
        "--tokens",
        "1500",
        "--max-len",
        str(MAX_LEN),
        "--batch-tokens",
        str(MAX_LEN),
        "--stats-dir",
        str(tmp_path / "dist"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RROME_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "dist" / single.path.name
    with safe_open(str(out), framework="pt") as fh:
        mom2, meta = fh.get_tensor("mom2"), fh.metadata()
    assert meta["world"] == "2" and meta["tokens"] == "1500"
    torch.testing.assert_close(mom2, single.mom2, rtol=1e-6, atol=1e-9)
    cached = list((tmp_path / "dist").glob("*.safetensors"))
    assert [p.name for p in cached] == [single.path.name]  # same key, no partials left


def test_rrome_stats_writes_where_rrome_edit_reads(tmp_path: Path) -> None:
    """`rrome stats --hparams H` caches C in H's stats_dir, the one `rrome edit --hparams H`
    reads: the edit finds it there and computes nothing more."""
    from typer.testing import CliRunner

    from rrome_cli.cli import app
    from rrome_cli.config import shipped_hparams

    stats_dir = tmp_path / "stats"
    text = shipped_hparams("tiny-llama").read_text()
    text = text.replace("mom2_adjustment: false", "mom2_adjustment: true")
    text = text.replace("mom2_n_samples: 2000", "mom2_n_samples: 300")
    hparams = tmp_path / "h.yaml"
    hparams.write_text(text + f"stats_dir: {stats_dir}\n")
    runner = CliRunner()
    args = ["--model", "tiny-llama", "--hparams", str(hparams)]
    result = runner.invoke(app, ["stats", *args])
    assert result.exit_code == 0, result.stderr
    [made] = stats_dir.glob("*.safetensors")
    sample = Path(__file__).resolve().parents[1] / "data" / "counterfact-sample.jsonl"
    out = tmp_path / "run"
    result = runner.invoke(app, ["edit", str(sample), *args, "--limit", "1", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    [source] = json.loads((out / "run.json").read_text())["covariance_from"]
    assert source["file"] == str(made) and list(stats_dir.glob("*.safetensors")) == [made]
