"""Official checkpoint format: `config.json` + `model.safetensors` or sharded `model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`, official key names. Safetensors only: nothing is ever unpickled.

Loading builds the model on the meta device and materializes one tensor at a time, casting to the requested
dtype. Each read maps its file only while that tensor is copied out, so the mapped pages of the shards never
add up in resident memory: loading peaks at about the weights' own bytes (`benchmarks/memory.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cheers.config import CheersConfig, ConfigError
from cheers.model.cheers import CheersModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TIED_HEAD = "lm_head.weight"
TIED_EMBED = "model.language_model.embed_tokens.weight"

log = logging.getLogger("cheers")


class CheckpointError(RuntimeError):
    """A checkpoint directory or file cannot be loaded; the message names the file and the cause."""


def _weight_files(directory: Path) -> dict[str, list[str]]:
    """file name -> keys it should hold (from the index, or from the single file's header)."""
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if not _inside(fname):
                raise CheckpointError(f"{index}: tensor '{key}' is mapped to {fname!r}, which is not a file name "
                                      f"inside {directory} (absolute paths and '..' are refused)")
            files.setdefault(fname, []).append(key)
        for fname in files:
            if not (directory / fname).exists():
                raise CheckpointError(f"{index}: lists shard '{fname}', which is missing from {directory}")
        return files
    single = directory / SINGLE_NAME
    if single.exists():
        return {SINGLE_NAME: []}
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(others) == 1:
        return {others[0]: []}
    if others:
        raise CheckpointError(f"{directory}: several .safetensors files ({', '.join(others)}) but no {INDEX_NAME}")
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise CheckpointError(f"{directory}: only pickle weights (.bin/.pt) found; Cheers loads safetensors only")
    raise CheckpointError(f"{directory}: no model weights (expected {SINGLE_NAME} or {INDEX_NAME})")


def _inside(fname: object) -> bool:
    """Whether an index entry names a file inside the model directory: a relative path without '..' (checked by
    name: a Hub cache snapshot's files are links into its blob store, which is fine)."""
    if not isinstance(fname, str) or not fname or "\\" in fname or "\0" in fname:
        return False
    p = PurePosixPath(fname)
    return not p.is_absolute() and ".." not in p.parts and not PureWindowsPath(fname).drive


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def _expected(model: CheersModel) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def _check_keys(found: dict[str, tuple[int, ...]], expected: dict[str, torch.Size], tied: bool, where: str) -> None:
    optional = {TIED_HEAD} if tied else set()
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(k for k in found if k not in expected)
    wrong = sorted(
        f"{k}: checkpoint {list(found[k])} vs config {list(expected[k])}"
        for k in found
        if k in expected and tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es) (config.json does not match the weights): {'; '.join(wrong)}")
        raise CheckpointError(f"{where}: " + " | ".join(parts))


def tensor_files(directory: str | os.PathLike) -> dict[str, Path]:
    """key -> the safetensors file that holds it, for an official weight directory."""
    directory = Path(directory)
    owner: dict[str, Path] = {}
    for name in _weight_files(directory):
        with _open(directory / name) as handle:
            owner.update({key: directory / name for key in handle.keys()})
    return owner


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One stored tensor (see `_read`)."""
    return _read(path, key)


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor, read through a mapping that is closed again right away (see the module docstring)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read tensor '{key}' ({err})") from None


_CHUNK = 1 << 24  # elements per piece when a whole-tensor temporary would add to the loading peak


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. A plain sum allocates nothing tensor-sized (an elementwise `isfinite`, or a sum in another
    dtype, would add temporaries to the loading peak): a finite sum proves every value finite; a non-finite one
    is either a NaN/inf or an overflow of huge values, which the exact check then tells apart, piece by piece."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHUNK]).all()) for i in range(0, flat.numel(), _CHUNK))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _same_rows(path: Path, key: str, loaded: torch.Tensor) -> bool:
    """Whether the stored `key` equals `loaded` (cast alike), compared a block of rows at a time. Read with plain
    file reads at the offsets of the safetensors header rather than through a mapping, so the stored copy never
    becomes resident beside the loaded weights."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(n))[key]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            if list(shape) != list(loaded.shape):
                return False
            row_bytes = (end - start) // max(1, shape[0])
            rows = max(1, _CHUNK // max(1, loaded[0].numel()))
            for lo in range(0, shape[0], rows):
                hi = min(shape[0], lo + rows)
                f.seek(8 + n + start + lo * row_bytes)
                raw = bytearray(f.read((hi - lo) * row_bytes))
                block = torch.frombuffer(raw, dtype=dtype).view(hi - lo, *shape[1:])
                if not torch.equal(block.to(device=loaded.device, dtype=loaded.dtype), loaded[lo:hi]):
                    return False
    except (OSError, KeyError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: cannot read tensor '{key}' ({err})") from None
    return True


def _castable(tensor: torch.Tensor) -> bool:
    """Float weights follow the requested dtype; integer and float8 (quantized) tensors keep their own."""
    return tensor.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def load_state_into(model: CheersModel, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu",
                    loaded: Callable[[str], None] | None = None) -> CheersModel:
    """Materialize `model` (may live on the meta device) from an official weight directory, strictly.
    `loaded(key)` is called after each tensor is in place (e.g. to quantize a layer once its weights are read).

    With `tie_word_embeddings: true` the output head *is* the input embedding, as in the reference (transformers
    ignores a stored `lm_head.weight` then); a stored head that differs is ignored with one warning."""
    directory = Path(directory)
    files = _weight_files(directory)
    expected = _expected(model)
    tied = model.config.text.tie_word_embeddings
    found: dict[str, tuple[int, ...]] = {}
    owner: dict[str, Path] = {}
    for name in files:
        with _open(directory / name) as handle:
            keys = list(handle.keys())
            for key in keys:
                try:
                    found[key] = tuple(handle.get_slice(key).get_shape())
                except Exception as err:
                    raise CheckpointError(f"{directory / name}: cannot read tensor '{key}' ({err})") from None
                owner[key] = directory / name
        listed = set(files[name])
        if listed and listed != set(keys):
            diff = sorted(listed.symmetric_difference(keys))[:5]
            raise CheckpointError(f"{directory / name}: keys differ from {INDEX_NAME} (e.g. {', '.join(diff)})")
    _check_keys(found, expected, tied, str(directory))

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    for key in expected:
        if key == TIED_HEAD and tied:
            continue
        tensor = _read(owner[key], key)
        target_dtype = dtype if _castable(tensor) else tensor.dtype
        tensor = tensor.to(device=device, dtype=target_dtype)
        if _castable(tensor) and not _all_finite(tensor):
            raise CheckpointError(f"{owner[key]}: tensor '{key}' contains NaN or inf")
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        if key in params:
            setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=params[key].requires_grad))
        elif key in buffers:
            module._buffers[leaf] = tensor
        if loaded is not None:
            loaded(key)
    model.tie_weights()
    if tied and TIED_HEAD in found and not _same_rows(owner[TIED_HEAD], TIED_HEAD, model.lm_head.weight.data):
        log.warning("%s: '%s' differs from '%s' but config.json ties them; the head is the embedding, as in "
                    "the reference (set text_config.tie_word_embeddings=false to use the stored head)",
                    owner[TIED_HEAD], TIED_HEAD, TIED_EMBED)
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftovers:  # pragma: no cover - guarded by _check_keys
        raise CheckpointError(f"{directory}: tensors left unloaded: {', '.join(leftovers)}")
    return model


def load_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", quantize: Any = None) -> CheersModel:
    """Load an official-format model directory into a `CheersModel` (eval mode). A quantized checkpoint loads
    as stored; `quantize` (a mode or `cheers.quantize.QuantSpec`) quantizes a float one layer by layer."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory}: no config.json (not a Cheers model directory)")
    try:
        cfg = CheersConfig.from_json_file(cfg_path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    from cheers import quantize as Q

    try:  # every quantization problem is reported before a single weight is read
        stored, spec = Q.resolve(cfg.quantization, Q.parse_spec(quantize), torch.device(device), str(cfg_path))
    except Q.QuantizationError as err:
        raise CheckpointError(str(err)) from None
    with torch.device("meta"):
        model = CheersModel(cfg)
    if stored is not None:
        Q.prepare_meta(model, stored)
        cfg.quantization = stored  # the mode it runs in (int8 and int8-weight share their stored weights)
    loaded = Q.quantize_on_load(model, spec) if spec is not None else None
    load_state_into(model, directory, dtype=dtype, device=device, loaded=loaded)
    if spec is not None:
        cfg.quantization = Q.record(spec, Q.names_of(model))
    return model.eval()


def _shards(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_model(model: CheersModel, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
               dtype: torch.dtype | None = None, include_tied_head: bool = True) -> Path:
    """Write config.json and weights in the official layout (sharded with an index when over `max_shard_bytes`).

    Every file is written to a temporary name and renamed, so an interrupted save leaves no half-written file
    under a final name. `dtype` casts floating tensors (e.g. torch.bfloat16 or torch.float16 for shipping).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == TIED_HEAD and model.config.text.tie_word_embeddings and not include_tied_head:
            continue
        tensor = tensor.detach().to("cpu")
        if dtype is not None and _castable(tensor):
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous().clone() if key == TIED_HEAD else tensor.contiguous()
    shards = _shards(state.items(), max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    # Write everything under temporary names first; only then replace, so an interruption leaves the previous
    # checkpoint in this directory intact.
    staged = []
    try:
        for name, shard in zip(names, shards):
            tmp = directory / f".{name}.tmp"
            staged.append((tmp, directory / name))
            save_file(shard, str(tmp), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {k: n for n, shard in zip(names, shards) for k in shard},
            }
            tmp = directory / f".{INDEX_NAME}.tmp"
            staged.append((tmp, directory / INDEX_NAME))
            tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    keep = {final.name for _, final in staged}
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_NAME]:
        if stale.exists() and stale.name not in keep:
            stale.unlink()
    umask = os.umask(0)
    os.umask(umask)
    for tmp, final in staged:
        os.chmod(tmp, 0o666 & ~umask)  # temp files are private; the checkpoint gets normal permissions
        os.replace(tmp, final)
    stored = {t.dtype for t in state.values() if _castable(t)}
    name = str(stored.pop()).removeprefix("torch.") if len(stored) == 1 else model.config.torch_dtype
    dataclasses.replace(model.config, torch_dtype=name).save_json(directory / "config.json")
    return directory
