"""Key statistics: the second moment C = (1/T) sum_t k_t k_t^T of the edited MLP's keys.

k is the input of the MLP output projection W (``names.rewrite(layer)``): for GPT-2 the GELU
activations, for SwiGLU models act(gate(x)) * up(x). R-ROME solves with C^-1, so C has to
describe the keys the layer sees on ordinary text; we estimate it on ``tokens`` tokens of a
corpus (one document per line by default).

How the pass runs:

- Documents are tokenised in corpus order, each split into rows of at most ``max_len`` tokens
  (one document per row, never two documents in one row, so no token attends across
  documents). The row stream is cut so exactly ``tokens`` tokens are counted.
- Rows are sorted by length within windows of SORT_WINDOW rows, then grouped into right-padded
  batches of at most ``batch_tokens`` padded positions; padding is masked out of the sums.
- The forward stops right after layer ``layer``; the keys are summed in float64 on the device of
  W, then divided by T and stored as float32 on the CPU.
- Under ``torchrun`` each rank takes batches ``i % world == rank`` and the float64 sums and
  counts are all-reduced; rank 0 writes the cache.
- The result is cached as safetensors keyed by model, revision, module, corpus bytes, token
  budget, max_len and dtype; partial sums are checkpointed so an interrupted run resumes. A
  local checkpoint's identity is the digest of its config and of its weight files' bytes
  (remembered by path, size and mtime), so one rewritten in place gets its own C.

Run under torchrun with ``torchrun --nproc_per_node K --no-python rrome stats --model M
--layer L``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rrome_cli.config import HParams
from rrome_cli.engine.hooks import capture_input, stop_after
from rrome_cli.engine.positions import pad_id, right_padded
from rrome_cli.files import cache_dir, save_safetensors_atomic
from rrome_cli.models.families import (
    ModuleNames,
    get_module,
    input_device,
    weight_as_out_in,
)
from rrome_cli.models.registry import ALIASES, DEFAULT_MODEL, TINY_PREFIX

if TYPE_CHECKING:
    from rrome_cli.models.loading import LoadedModel

# Measured on SmolLM2 (layer 5, 20 CounterFact edits): C from 20k tokens gives the same edit
# metrics as from 200k (rewrite 0.90 / rephrase 0.275 / locality 1.0 both), though u itself
# still turns (median cos(u_20k, u_200k) = 0.85); see docs/recipe.md.
DEFAULT_TOKENS = 20_000
DEFAULT_MAX_LEN = 512
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_CHECKPOINT_EVERY = 50_000  # tokens of the whole stream between partial saves
FORMAT = "rrome-mom2/1"
DEFAULT_CORPUS = "wiki-summaries.txt"
TEXT_FIELD = "text"
_TOKENIZE_CHUNK = 64  # documents per tokenizer call
SORT_WINDOW = 1024  # rows sorted by length together, to cut padding
# Metadata that must match for a cached file to be used (the rest is informational).
KEY_FIELDS = (
    "format",
    "model",
    "revision",
    "module",
    "corpus_hash",
    "tokens",
    "max_len",
    "dtype",
    "d_in",
)


class StatsCacheWarning(UserWarning):
    """A cached or partial statistics file was unusable and is being recomputed."""


class CorpusError(ValueError):
    """The corpus cannot be read, lacks a text field, or is too small for the token budget."""


@dataclass
class SecondMoment:
    mom2: torch.Tensor  # (d_in, d_in) float32 on the CPU: (1/T) sum k k^T
    tokens: int  # T, the tokens counted
    source: str  # corpus path or dataset id
    path: Path | None  # the cache file, None when nothing was written
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    source: str  # what the user named (file path or hub dataset id)
    digest: str  # sha256 of the file bytes, or "hub:<id>:<config>:<split>"
    opener: Callable[[], Iterable[dict[str, Any]]]

    def documents(self) -> Iterator[str]:
        """Non-empty documents, in corpus order."""
        for number, row in enumerate(self.opener(), start=1):
            if TEXT_FIELD not in row:
                fields_ = ", ".join(sorted(row)) or "none"
                raise CorpusError(
                    f"{self.source}: record {number} has no {TEXT_FIELD!r} field "
                    f"(fields: {fields_})"
                )
            text = row[TEXT_FIELD]
            if isinstance(text, str) and text.strip():
                yield text


def default_corpus_path() -> Path:
    """The Wikipedia summaries shipped with the package (CC BY-SA 4.0, see its README)."""
    return Path(str(resources.files("rrome_cli") / "data" / "corpus" / DEFAULT_CORPUS))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_builder(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith((".jsonl", ".json")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _stream(*args: Any, **kwargs: Any) -> Callable[[], Iterable[dict[str, Any]]]:
    """A function opening a fresh ``datasets`` stream each time (resume re-reads from the top)."""

    def opener() -> Iterable[dict[str, Any]]:
        from datasets import load_dataset

        return load_dataset(*args, streaming=True, **kwargs)

    return opener


def open_corpus(spec: str | None) -> Corpus:
    """A local file (.txt: one document per line; .jsonl/.json/.parquet: a ``text`` field) or a
    hub dataset ``ID[:CONFIG[:SPLIT]]`` (needs the hub); None is the shipped default."""
    path = Path(spec) if spec else default_corpus_path()
    if path.is_file():
        builder = _file_builder(path)
        opener = _stream(builder, data_files=str(path), split="train")
        return Corpus(str(path), _file_digest(path), opener)
    if path.exists():
        raise CorpusError(f"--corpus {spec}: not a file (give a .txt, .jsonl or .parquet file)")
    if spec is None:
        raise CorpusError(f"the default corpus is missing from the installation: {path}")
    if spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".jsonl", ".json", ".parquet")):
        raise CorpusError(f"--corpus {spec}: no such file")
    dataset_id, config, split = (spec.split(":") + [None, None])[:3]
    split = split or "train"

    def hub_opener() -> Iterable[dict[str, Any]]:
        try:
            return _stream(dataset_id, config, split=split)()
        except Exception as err:  # any hub or network failure gets the same advice
            raise CorpusError(
                f"--corpus {spec}: cannot open hub dataset {dataset_id!r} (config {config}, "
                f"split {split}): {err}. Offline? Pass a local .txt/.jsonl/.parquet file."
            ) from None

    return Corpus(spec, f"hub:{dataset_id}:{config or ''}:{split}", hub_opener)


# ---------------------------------------------------------------------------------- token stream


def token_rows(
    tok: PreTrainedTokenizerBase, documents: Iterable[str], max_len: int
) -> Iterator[list[int]]:
    """Token ids of each document (tokenizer's own special tokens), in rows of <= max_len."""

    def flush(texts: list[str]) -> Iterator[list[int]]:
        for ids in tok(texts, add_special_tokens=True, verbose=False)["input_ids"]:
            for start in range(0, len(ids), max_len):
                yield ids[start : start + max_len]

    chunk: list[str] = []
    for text in documents:
        chunk.append(text)
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from flush(chunk)
            chunk = []
    if chunk:
        yield from flush(chunk)


def within_budget(rows: Iterable[list[int]], budget: int) -> Iterator[list[int]]:
    """The rows until ``budget`` tokens; the last one is cut so the total is exactly ``budget``.

    Cutting the end of a row keeps its earlier keys unchanged: the models are causal.
    """
    counted = 0
    for row in rows:
        row = row[: budget - counted]
        counted += len(row)
        if row:
            yield row
        if counted == budget:
            return
    raise CorpusError(
        f"the corpus holds only {counted} tokens but the token budget is {budget}; "
        "lower --tokens or give a larger --corpus"
    )


def length_sorted(rows: Iterable[list[int]], window: int) -> Iterator[list[int]]:
    """Rows sorted by length within consecutive windows of ``window`` rows.

    Batches of similar lengths waste less compute on padding (on the shipped corpus, padded
    positions drop from about 1.95x to 1.05x the real tokens); the order stays deterministic.
    """
    buffer: list[list[int]] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) == window:
            yield from sorted(buffer, key=len)
            buffer = []
    yield from sorted(buffer, key=len)


def token_batches(rows: Iterable[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Consecutive rows grouped so that rows x longest row <= batch_tokens (the padded size)."""
    batch: list[list[int]] = []
    longest = 0
    for row in rows:
        wider = max(longest, len(row))
        if batch and (len(batch) + 1) * wider > batch_tokens:
            yield batch
            batch, wider = [], len(row)
        batch.append(row)
        longest = wider
    if batch:
        yield batch


def batch_stream(
    tok: PreTrainedTokenizerBase, corpus: Corpus, tokens: int, max_len: int, batch_tokens: int
) -> Iterator[list[list[int]]]:
    """The batches of the pass, the same on every rank and every run."""
    rows = within_budget(token_rows(tok, corpus.documents(), max_len), tokens)
    return token_batches(length_sorted(rows, SORT_WINDOW), batch_tokens)


# -------------------------------------------------------------------------------- cache identity


DIGESTS_FILE = "weight-digests.json"  # in the statistics cache directory


def _local_model_digest(path: Path, stats_dir: Path | None = None) -> str:
    """config.json bytes, weights index bytes, and each weight file's name and the sha256 of
    its bytes. Names and sizes alone kept a checkpoint rewritten in place (``rrome apply
    --overwrite``, a fine-tune saved to the same folder) on the old C."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    remembered = _Digests(stats_dir)
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{remembered.of(weights)}\n".encode())
    remembered.save()
    return digest.hexdigest()[:16]


class _Digests:
    """sha256 of weight files, remembered by (path, size, mtime): a 7B checkpoint is read
    once (about 10 s), not at every run. A file rewritten in place changes its mtime (and
    usually its size), so it is hashed again."""

    def __init__(self, stats_dir: Path | None) -> None:
        if stats_dir is None:
            stats_dir = cache_dir() / "stats"
        self.path = Path(stats_dir) / DIGESTS_FILE
        self.changed = False
        try:
            self.table: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: hashed again
            self.table = {}
        if not isinstance(self.table, dict):
            self.table = {}

    def of(self, file: Path) -> str:
        info = file.stat()
        key = str(file.resolve())
        stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        known = self.table.get(key)
        if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp:
            return str(known.get("sha256"))
        self.table[key] = stamp | {"sha256": _file_digest(file)}
        self.changed = True
        return self.table[key]["sha256"]

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.table, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a read-only cache: the digests are computed again next time
            pass


def model_identity(model_id: str, revision: str | None, stats_dir: Path | None = None) -> str:
    """Hub id and revision; for a local checkpoint (or the embedded model) a content digest
    (weight file digests remembered under ``stats_dir``)."""
    if model_id.startswith(TINY_PREFIX):
        return model_id  # built in-process from a fixed seed
    if model_id == DEFAULT_MODEL:
        from rrome_cli.models.loading import embedded_model_dir

        # The embedded model is dequantised from a GGUF, so it is not the hub checkpoint.
        return f"embedded:{DEFAULT_MODEL}:{_local_model_digest(embedded_model_dir(), stats_dir)}"
    path = Path(model_id).expanduser()
    if path.is_dir():
        return f"local:{_local_model_digest(path, stats_dir)}"
    return f"hub:{ALIASES.get(model_id, model_id)}@{revision or 'main'}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_path(stats_dir: Path, model_id: str, key: dict[str, str]) -> Path:
    """``<model>__<module>__<digest of the key>.safetensors``: one file per key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_id).name or model_id)
    return stats_dir / f"{model}__{key['module']}__{digest}.safetensors"


def _partial_path(final: Path, rank: int, world: int) -> Path:
    stem = final.name.removesuffix(".safetensors")
    ranked = f".rank{rank}of{world}" if world > 1 else ""
    return final.with_name(f"{stem}{ranked}.partial.safetensors")


def _mismatch(metadata: dict[str, str], expected: dict[str, str]) -> str | None:
    for name in KEY_FIELDS:
        if metadata.get(name) != expected[name]:
            return f"{name} is {metadata.get(name)!r}, expected {expected[name]!r}"
    return None


def _read(path: Path, name: str) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name), dict(fh.metadata() or {})


def load_cached(path: Path, expected: dict[str, str]) -> SecondMoment | None:
    """The cached statistics if ``path`` holds them for exactly ``expected``; else None, with a
    StatsCacheWarning when a file was there but unusable."""
    if not path.exists():
        return None
    try:
        mom2, metadata = _read(path, "mom2")
    except Exception as err:  # any unreadable file is recomputed
        warnings.warn(
            f"{path}: unreadable statistics ({err}); recomputing", StatsCacheWarning, stacklevel=3
        )
        return None
    problem = _mismatch(metadata, expected)
    d_in = int(expected["d_in"])
    if problem is None and (mom2.shape != (d_in, d_in) or mom2.dtype != torch.float32):
        problem = f"tensor is {tuple(mom2.shape)} {mom2.dtype}, expected ({d_in}, {d_in}) float32"
    if problem is None and not torch.isfinite(mom2).all():
        problem = "tensor has non-finite values"
    if problem is not None:
        warnings.warn(
            f"{path}: cached statistics do not match ({problem}); recomputing",
            StatsCacheWarning,
            stacklevel=3,
        )
        return None
    return SecondMoment(mom2, int(metadata["tokens"]), metadata.get("corpus", ""), path, metadata)


# ----------------------------------------------------------------------------------- accumulate


@dataclass
class _Partial:
    """Running float64 sum of k k^T over this rank's batches before ``next_batch``."""

    mom2_sum: torch.Tensor  # (d_in, d_in) float64, on W's device
    tokens: int = 0
    next_batch: int = 0

    def add(self, keys: torch.Tensor, mask: torch.Tensor) -> None:
        """keys (rows, seq, d_in) in the model dtype; mask (rows, seq), 1 on real tokens."""
        real = keys.reshape(-1, keys.shape[-1])[mask.reshape(-1).to(keys.device).bool()]
        real = real.to(device=self.mom2_sum.device, dtype=torch.float64)
        self.mom2_sum.addmm_(real.T, real)
        self.tokens += real.shape[0]


def _partial_metadata(
    key: dict[str, str], batch_tokens: int, rank: int, world: int, partial: _Partial
) -> dict[str, str]:
    return {
        **key,
        "batch_tokens": str(batch_tokens),
        "sort_window": str(SORT_WINDOW),
        "rank": str(rank),
        "world": str(world),
        "tokens_done": str(partial.tokens),
        "next_batch": str(partial.next_batch),
    }


def _resume(path: Path, fresh: _Partial, expected: dict[str, str]) -> _Partial:
    """The checkpoint at ``path`` if it continues this exact run; else ``fresh`` (warning)."""
    if not path.exists():
        return fresh
    try:
        mom2_sum, metadata = _read(path, "mom2_sum")
        problem = next(
            (
                f"{k} is {metadata.get(k)!r}, expected {v!r}"
                for k, v in expected.items()
                if metadata.get(k) != v
            ),
            None,
        )
        if problem is None and mom2_sum.shape != fresh.mom2_sum.shape:
            problem = f"tensor is {tuple(mom2_sum.shape)}"
        if problem is None:
            tokens, next_batch = int(metadata["tokens_done"]), int(metadata["next_batch"])
            device = fresh.mom2_sum.device
            return _Partial(mom2_sum.to(device=device, dtype=torch.float64), tokens, next_batch)
    except Exception as err:  # a damaged checkpoint only costs a restart
        problem = str(err)
    warnings.warn(
        f"{path}: ignoring checkpoint ({problem}); starting from the beginning",
        StatsCacheWarning,
        stacklevel=3,
    )
    return fresh


def _keys_of(
    model: PreTrainedModel, names: ModuleNames, layer: int, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """W's input for one batch, (rows, seq, d_in); nothing above ``layer`` is computed."""
    captured: list[torch.Tensor] = []
    block = get_module(model, names.layer(layer))
    rewrite = get_module(model, names.rewrite(layer))
    with torch.inference_mode(), stop_after(block), capture_input(rewrite, captured.append):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    if len(captured) != 1:
        raise RuntimeError(
            f"{names.rewrite(layer)} ran {len(captured)} times in one forward; expected once"
        )
    return captured[0]


# ------------------------------------------------------------------------------------ progress


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _TokensPerSecond(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


# -------------------------------------------------------------------------------- distribution


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; NCCL needs the tensor on this rank's GPU, gloo takes it on the CPU."""
    if _world()[1] == 1:
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        tensor = tensor.cuda()
    elif dist.get_backend() == "gloo" and device.type != "cpu":
        tensor = tensor.cpu()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(device)


def _all_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (so all ranks take the same path)."""
    votes = _all_reduce(torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=device))
    return votes.item() == 0.0


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


@contextmanager
def distributed_from_env() -> Iterator[tuple[int, int]]:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1.

    Yields (rank, world); a group this function created is destroyed on exit.
    """
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield _world()
    finally:
        if created:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------- the pass


def _key(
    model: PreTrainedModel,
    names: ModuleNames,
    layer: int,
    model_id: str,
    revision: str | None,
    corpus: Corpus,
    tokens: int,
    max_len: int,
    stats_dir: Path | None = None,
) -> dict[str, str]:
    weight = weight_as_out_in(get_module(model, names.rewrite(layer)))
    return {
        "format": FORMAT,
        "model": model_identity(model_id, revision, stats_dir),
        "revision": revision or "",
        "module": names.rewrite(layer),
        "corpus_hash": corpus.digest,
        "tokens": str(tokens),
        "max_len": str(max_len),
        "dtype": _dtype_name(weight.dtype),
        "d_in": str(weight.shape[1]),
    }


def _accumulate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    corpus: Corpus,
    key: dict[str, str],
    batch_tokens: int,
    partial_path: Path,
    checkpoint_every: int,
    progress: bool,
) -> _Partial:
    """Run this rank's share of the batches, resuming from and saving to ``partial_path``."""
    rank, world = _world()
    tokens, max_len = int(key["tokens"]), int(key["max_len"])
    weight = weight_as_out_in(get_module(model, names.rewrite(layer)))
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    fresh = _Partial(
        torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)
    )
    meta = _partial_metadata(key, batch_tokens, rank, world, fresh)
    expected = {k: meta[k] for k in (*KEY_FIELDS, "batch_tokens", "sort_window", "rank", "world")}
    state = _resume(partial_path, fresh, expected)
    device, pad = input_device(model), pad_id(tok)
    seen, saved_at = 0, 0  # tokens of the whole stream passed, and at the last save
    with _progress_bar(progress and rank == 0) as bar:
        task = None
        for index, batch in enumerate(batch_stream(tok, corpus, tokens, max_len, batch_tokens)):
            seen += sum(len(r) for r in batch)
            if index < state.next_batch:
                saved_at = seen
                continue
            if task is None:
                task = bar.add_task(f"key stats {key['module']}", total=tokens, completed=saved_at)
            if index % world == rank:
                ids, mask = right_padded(batch, pad, device)
                state.add(_keys_of(model, names, layer, ids, mask), mask)
            state.next_batch = index + 1
            bar.update(task, completed=seen)
            if seen - saved_at >= checkpoint_every and seen < tokens:
                meta = _partial_metadata(key, batch_tokens, rank, world, state)
                save_safetensors_atomic(partial_path, {"mom2_sum": state.mom2_sum.cpu()}, meta)
                saved_at = seen
    return state


def second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    names: ModuleNames,
    layer: int,
    *,
    model_id: str,
    revision: str | None = None,
    corpus: str | None = None,
    tokens: int | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    stats_dir: Path | None = None,
    progress: bool = True,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> SecondMoment:
    """C = (1/T) sum k k^T of W = ``names.rewrite(layer)``'s input over ``tokens`` corpus tokens.

    Loaded from the cache under ``stats_dir`` (default ``cache_dir()/stats``) when a file with
    the same key exists; else computed, cached, and returned. Under an initialised
    torch.distributed group every rank must call this; all ranks return the same C.
    """
    tokens = DEFAULT_TOKENS if tokens is None else tokens
    if tokens < 1 or max_len < 1 or checkpoint_every < 1:
        raise ValueError("tokens, max_len and checkpoint_every must be positive")
    if batch_tokens < max_len:
        raise ValueError(f"batch_tokens ({batch_tokens}) must be at least max_len ({max_len})")
    if stats_dir is None:
        stats_dir = cache_dir() / "stats"
    source = open_corpus(corpus)
    key = _key(model, names, layer, model_id, revision, source, tokens, max_len, Path(stats_dir))
    path = cache_path(Path(stats_dir), model_id, key)
    rank, world = _world()
    cached = load_cached(path, key)
    device = weight_as_out_in(get_module(model, names.rewrite(layer))).device
    if _all_agree(cached is not None, device if device.type != "meta" else torch.device("cpu")):
        # the same bytes (by digest) may have been cached from another path: name this one
        return replace(cached, source=source.source)  # type: ignore[arg-type]
    partial_path = _partial_path(path, rank, world)
    state = _accumulate(
        model,
        tok,
        names,
        layer,
        source,
        key,
        batch_tokens,
        partial_path,
        checkpoint_every,
        progress,
    )
    mom2_sum = _all_reduce(state.mom2_sum)
    total = int(
        _all_reduce(
            torch.tensor([state.tokens], dtype=torch.float64, device=mom2_sum.device)
        ).item()
    )
    if total != tokens:
        raise RuntimeError(f"counted {total} tokens, expected {tokens}: batches were lost")
    mom2 = (mom2_sum / total).to(device="cpu", dtype=torch.float32)
    metadata = {
        **key,
        "corpus": source.source,
        "layer": str(layer),
        "model_id": model_id,
        "batch_tokens": str(batch_tokens),
        "world": str(world),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    if rank == 0:
        save_safetensors_atomic(path, {"mom2": mom2}, metadata)
    _barrier()
    partial_path.unlink(missing_ok=True)
    return SecondMoment(mom2, total, source.source, path, metadata)


# ------------------------------------------------------------------------------------------ CLI


def stats_command(
    model: str | None,
    layer: int,
    corpus: str | None,
    tokens: int | None,
    max_len: int = DEFAULT_MAX_LEN,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    stats_dir: Path | None = None,
    dtype: str | None = None,
    devices: str | None = None,
    *,
    hparams: HParams | None = None,
) -> SecondMoment:
    """``rrome stats``: load ``model`` and compute (or load) the statistics of ``layer``; under
    torchrun each rank joins the process group and uses GPU LOCAL_RANK unless ``devices`` says
    otherwise.

    ``hparams`` supplies module names, ``mom2_n_samples`` (when ``tokens`` is None) and
    ``stats_dir``.
    """
    from rrome_cli.models.loading import load_model

    with distributed_from_env() as (_, world):
        if world > 1 and devices is None and torch.cuda.is_available():
            devices = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        if tokens is None and hparams is not None:
            tokens = hparams.mom2_n_samples
        if stats_dir is None and hparams is not None and hparams.stats_dir:
            stats_dir = Path(hparams.stats_dir)
        loaded = load_model(model, dtype, devices, hparams)
        return second_moment_of(
            loaded,
            layer,
            corpus=corpus,
            tokens=tokens,
            max_len=max_len,
            batch_tokens=batch_tokens,
            stats_dir=stats_dir,
        )


def second_moment_of(loaded: LoadedModel, layer: int, **options: Any) -> SecondMoment:
    """``second_moment`` for a model from ``load_model`` (its identity and revision included)."""
    return second_moment(
        loaded.model,
        loaded.tok,
        loaded.names,
        layer,
        model_id=loaded.model_id,
        revision=loaded.revision,
        **options,
    )
