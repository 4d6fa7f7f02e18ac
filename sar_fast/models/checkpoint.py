"""Load the checkpoints users bring, export ones the original code loads.

Accepted: FlexVAR/SAR training checkpoints `ar-ckpt-*.pth` ({'trainer': {'var_wo_ddp':
state_dict, ...}, 'args': ...}), flat state dicts (`FlexVARd16-epo179.pth`, SAR's released
weights, VAR's `var_d16.pth`), sar_fast exports ({'config': ..., 'model': ...}), and
DDP/compile-wrapped keys ('module.', '_orig_mod.'), as a `.pth`, a `.safetensors`, a sharded
`*.safetensors.index.json` or an `hf://OWNER/REPO/FILE[@REVISION]` id of any of them. Arch,
depth, width, heads, vocab, code dim, classes and (VAR) schedule are inferred from the weights.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from ..files import atomic_path, atomic_write
from ..hub import resolve_weights_path
from ..safe_load import CheckpointError, describe_folder, load_file, require_nonempty_file
from ..schedules import STANDARD_SCHEDULE
from .transformer import ModelConfig, ScaleAR

# Buffers the originals keep in their state dicts that sar_fast derives instead.
_DERIVED = ("attn_bias_for_masking", "lvl_1L")
_DERIVED_BLOCK = re.compile(r"^blocks\.\d+\.attn\.zero_k_bias$")


def read_checkpoint_file(path: str | os.PathLike, mmap: bool = False, shapes_only: bool = False) -> Any:
    """The object in a checkpoint file, on CPU: the one reader of weights files. `path` may be
    an hf:// id (sar_fast.hub). A `.safetensors` file or sharded index is read by safetensors
    (a flat dict of tensors; nothing in it can run); anything else by sar_fast.safe_load:
    tensors, containers and arrays only, classes of the original training code as inert
    stand-ins; anything else, and malformed files, raise CheckpointError. `mmap`: map a .pth's
    tensors instead of reading them. `shapes_only` (preflight checks): a .safetensors' floating
    point tensors come back on the meta device, unread."""
    path = resolve_weights_path(path)
    if is_safetensors_path(path):
        return read_safetensors(path, shapes_only=shapes_only)
    return load_file(path, map_location="cpu", mmap=mmap or shapes_only)


# ----------------------------------------------------------------------------- safetensors
INDEX_SUFFIX = ".safetensors.index.json"
# safetensors' dtype names -> torch (what `shapes_only` needs without reading the data)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_safetensors_path(path: str) -> bool:
    """A `.safetensors` file or a sharded index (`*.index.json`, as Hugging Face writes it)."""
    return path.endswith(".safetensors") or path.endswith(".index.json")


def read_safetensors(path: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of every shard of a sharded index, on CPU."""
    if path.endswith(".index.json"):
        return _read_index(path, shapes_only)
    return _read_safetensors_file(path, shapes_only)


def _read_safetensors_file(path: str, shapes_only: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    require_nonempty_file(path, "a safetensors file")
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype()) if shapes_only else None
                out[key] = torch.empty(f.get_slice(key).get_shape(), dtype=dtype, device="meta") if dtype \
                    else f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (damaged or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    return out


def _read_index(path: str, shapes_only: bool) -> dict[str, torch.Tensor]:
    """A sharded checkpoint: the index must be JSON with a `weight_map` {key: shard file};
    every shard a .safetensors file present in the index's folder (no other path), holding
    exactly the keys the map gives it; no key in two shards."""
    if os.path.isdir(path):
        raise CheckpointError(describe_folder(path))
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a JSON safetensors index ({type(e).__name__}: {e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: expected a safetensors index: a JSON object whose 'weight_map' maps each "
                              f"tensor name to its shard file")
    folder, out, where = os.path.dirname(path), {}, {}
    for shard in sorted(set(weight_map.values())):
        norm = os.path.normpath(shard)
        if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or "\\" in shard:
            raise CheckpointError(f"{path}: refused: the shard {shard!r} lies outside the index's folder")
        if not shard.endswith(".safetensors"):
            raise CheckpointError(f"{path}: the shard {shard!r} is not a .safetensors file")
        file = os.path.join(folder, norm)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: the shard {shard} is missing (expected {file})")
        for key, value in _read_safetensors_file(file, shapes_only).items():
            if key in where:
                raise CheckpointError(f"{path}: the tensor {key!r} is in two shards ({where[key]} and {shard})")
            where[key], out[key] = shard, value
    misplaced = sorted(k for k, shard in where.items() if weight_map.get(k) != shard)
    if misplaced:
        k, more = misplaced[0], len(misplaced) - 1
        raise CheckpointError(f"{path}: the shard {where[k]} holds {k!r}, which the index maps to "
                              f"{weight_map.get(k)!r}" + (f" (+{more} more)" if more else ""))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors of the index are in no shard: {_short(missing)}")
    return out


def standalone_tensors(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors can store them: on CPU, detached, each the sole owner of a
    contiguous storage (views, slices and tensors sharing storage become contiguous clones;
    others are kept as they are, uncopied)."""
    out, owners = {}, set()
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"safetensors holds str -> tensor only; {key!r} is {type(t).__name__}")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not whole or storage.data_ptr() in owners or storage.nbytes() == 0:
            t = t.contiguous().clone()
        owners.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """A .safetensors file of `tensors` (keys and values as given), written to a temporary
    file beside `path`, flushed to disk, then renamed."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(standalone_tensors(tensors), tmp, metadata={"format": "pt", **(metadata or {})})


def find_model_mapping(obj: Any) -> tuple[Mapping[str, Any], dict | None]:
    """The mapping that holds the model's weights in any supported checkpoint layout (keys
    as stored), and the sar_fast config if the checkpoint carries one."""
    config = None
    if isinstance(obj, Mapping):
        if "trainer" in obj and isinstance(obj["trainer"], Mapping) and "var_wo_ddp" in obj["trainer"]:
            obj = obj["trainer"]["var_wo_ddp"]
        elif "model" in obj and isinstance(obj["model"], Mapping):
            config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
            obj = obj["model"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError("no model state dict found (expected a flat state dict, an 'ar-ckpt' with "
                              "trainer.var_wo_ddp, or {'model': ...})")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("no model state dict found: the checkpoint holds no tensors at the model level")
    return obj, dict(config) if config else None


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The transformer's flat state dict inside any supported checkpoint layout (wrapper
    names dropped), and the sar_fast config if the checkpoint carries one."""
    mapping, config = find_model_mapping(obj)
    return {clean_key(k): v for k, v in mapping.items() if isinstance(v, torch.Tensor)}, config


def clean_key(key: str) -> str:
    """Drop wrapper names: DDP's 'module.', torch.compile's '_orig_mod.', activation
    checkpointing's '_checkpoint_wrapped_module.'."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def infer_config(sd: Mapping[str, torch.Tensor], arch: str | None = None) -> dict:
    """Model hyperparameters read off the weights."""
    need = ("class_emb.weight", "word_embed.weight", "head.weight", "pos_1LC")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a FlexVAR/VAR transformer state dict: missing {missing} "
                              f"(found e.g. {sorted(sd)[:5]})")
    if any(k.startswith("shared_ada_lin.") for k in sd):
        raise CheckpointError("checkpoints with shared AdaLN (shared_aln=True) are not supported")
    detected = "var" if "lvl_embed.weight" in sd else "flexvar"
    if arch is not None and arch != detected:
        raise CheckpointError(f"arch={arch!r} was requested but the weights are a {detected} model "
                              f"({'has' if detected == 'var' else 'has no'} lvl_embed)")
    C = sd["class_emb.weight"].shape[1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth < 1:
        raise CheckpointError("no transformer blocks (blocks.N.*) in the state dict")
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else max(C // 64, 1)
    cfg = dict(arch=detected, depth=depth, embed_dim=C, num_heads=heads,
               mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C if "blocks.0.ffn.fc1.weight" in sd else 4.0,
               vocab_size=sd["head.weight"].shape[0], code_dim=sd["word_embed.weight"].shape[1],
               num_classes=sd["class_emb.weight"].shape[0] - 1, attn_l2_norm=l2)
    if detected == "flexvar":
        cfg["pos_grid"] = sd["pos_1LC"].shape[-1]
    else:
        cfg["schedule"] = _var_schedule(sd)
    return cfg


def _var_schedule(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """VAR's schedule from its lvl_1L buffer (scale id per token), or the standard one."""
    L, n = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0]
    if "lvl_1L" in sd:
        counts = Counter(sd["lvl_1L"].flatten().tolist())
        sides = []
        for i in range(n):
            side = round(counts.get(i, 0) ** 0.5)
            if side * side != counts.get(i, 0):
                raise CheckpointError(f"lvl_1L has {counts.get(i, 0)} tokens at scale {i}: not a square map")
            sides.append(side)
        return tuple(sides)
    if n == len(STANDARD_SCHEDULE) and L == STANDARD_SCHEDULE.total:
        return STANDARD_SCHEDULE
    raise CheckpointError(f"cannot infer the VAR schedule of a {n}-scale, L={L} model without lvl_1L; "
                          f"pass schedule=... explicitly")


def load_checkpoint(path_or_state_dict: str | os.PathLike | Mapping, arch: str | None = None,
                    strict: bool = True, **overrides) -> ScaleAR:
    """Build a ScaleAR from any supported checkpoint; the config is inferred from the weights
    (overrides win, e.g. cond_drop_rate=0.0). Fails listing missing/unexpected keys; errors
    about a file name the file."""
    from_file = not isinstance(path_or_state_dict, Mapping)
    obj = read_checkpoint_file(path_or_state_dict) if from_file else path_or_state_dict
    try:
        sd, saved_config = extract_state_dict(obj)
        cfg = dict(saved_config) if saved_config else infer_config(sd, arch)
        if saved_config and arch is not None and saved_config.get("arch") != arch:
            raise CheckpointError(f"arch={arch!r} requested but the checkpoint is {saved_config.get('arch')!r}")
        cfg.update(overrides)
        model = ScaleAR(ModelConfig(**cfg))
        load_model_state(model, sd, strict=strict, source=os.fspath(path_or_state_dict) if from_file else None)
    except CheckpointError as e:
        if from_file:
            raise CheckpointError(f"{os.fspath(path_or_state_dict)}: {e}") from None
        raise
    return model


def preflight_checkpoint(path: str | os.PathLike) -> dict:
    """Everything load_checkpoint checks except the weight values, cheaply (tensors are
    memory-mapped, the model is built on the meta device): a launcher calls it before any
    process group exists, so a bad file fails once instead of on every rank. Returns the
    model config."""
    obj = read_checkpoint_file(path, shapes_only=True)
    try:
        sd, saved_config = extract_state_dict(obj)
        cfg = dict(saved_config) if saved_config else infer_config(sd)
        with torch.device("meta"):
            own = ScaleAR(ModelConfig(**cfg)).state_dict()
        check_state_fits(own, {k: v for k, v in sd.items() if k not in _DERIVED and not _DERIVED_BLOCK.match(k)},
                         "the model")
    except (CheckpointError, TypeError) as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from None
    return cfg


def load_model_state(model: ScaleAR, sd: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str | None = None) -> None:
    """Copy weights in, ignoring the originals' derived buffers; clear errors on mismatch."""
    own = model.state_dict()
    clean = {k: v for k, v in sd.items() if k not in _DERIVED and not _DERIVED_BLOCK.match(k)}
    check_state_fits(own, clean, "the model", strict=strict)
    check_weight_values(own, clean, source)
    model.load_state_dict({k: v for k, v in clean.items() if k in own}, strict=False)


def check_weight_values(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                        source: str | None = None) -> None:
    """Weights must be floating point where the module's are (an integer or bool tensor
    would be cast silently by load_state_dict); NaN/Inf weights are a warning with the count
    (a diverged run's checkpoint still loads, for inspection)."""
    wrong = [f"{k}: {v.dtype} (expected floating point)" for k, v in sd.items()
             if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if wrong:
        raise CheckpointError(f"wrong tensor dtypes ({len(wrong)}): {_short(wrong)}")
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in sd.items() if k in own and v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        where = f"{source}: " if source else ""
        warnings.warn(f"{where}{sum(bad.values())} non-finite (NaN/Inf) weight values in {len(bad)} tensors: "
                      f"{_short([f'{k} ({n})' for k, n in bad.items()])}", RuntimeWarning, stacklevel=3)


def check_state_fits(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str,
                     strict: bool = True, resizable: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key (missing and
    unexpected only when strict); keys in `resizable` may change shape."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mis_shaped = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape and k not in resizable]
    if mis_shaped or (strict and (missing or unexpected)):
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mis_shaped:
            lines.append(f"shape mismatches ({len(mis_shaped)}): {_short(mis_shaped)}")
        raise CheckpointError(f"checkpoint does not fit {what}:\n  " + "\n  ".join(lines))


def _short(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def export_state_dict(model: ScaleAR, patch_nums: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """A flat fp32 state dict the original FlexVAR/VAR module loads with strict=True: ours
    plus the buffers the originals keep (the dense mask for `patch_nums` — the model's
    schedule by default —, VAR's lvl_1L, the zero k-bias of every block)."""
    return export_from_state_dict(model.state_dict(), model.config, patch_nums)


def export_from_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig,
                           patch_nums: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """export_state_dict for a (gathered, possibly wrapper-named) state dict and its config."""
    sd = {clean_key(k): v.detach().float().cpu().clone() for k, v in state.items()}
    schedule = tuple(patch_nums or config.schedule)
    scale_id = torch.cat([torch.full((s * s,), i) for i, s in enumerate(schedule)])
    sd["attn_bias_for_masking"] = torch.where(scale_id[:, None] >= scale_id[None, :], 0.0, -torch.inf) \
        .reshape(1, 1, len(scale_id), len(scale_id))
    if config.arch == "var":
        sd["lvl_1L"] = scale_id.view(1, -1)
    for i in range(config.depth):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(config.embed_dim)
    return sd


def save_export(model_or_state: ScaleAR | Mapping[str, torch.Tensor], path: str | os.PathLike | Sequence,
                config: ModelConfig | None = None) -> None:
    """Write the export (of a model, or of a gathered state dict + its config) atomically, to
    one path or to several (built once); each path's suffix picks its format: `.safetensors`,
    anything else torch.save (the `.pth` the original code loads)."""
    if isinstance(model_or_state, ScaleAR):
        exported = export_state_dict(model_or_state)
    else:
        if config is None:
            raise ValueError("save_export of a state dict needs its ModelConfig")
        exported = export_from_state_dict(model_or_state, config)
    for target in [path] if isinstance(path, (str, os.PathLike)) else path:
        target = os.fspath(target)
        if target.endswith(".safetensors"):
            write_safetensors(exported, target)
        else:
            write_pth(exported, target)


def write_pth(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def weights_sha256(spec: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 of a weights file (an hf:// id resolved); of a sharded index, over the index and
    every shard it names, in name order: what identifies the weights."""
    path = resolve_weights_path(spec)
    files = [path]
    if path.endswith(".index.json"):
        read_safetensors(path, shapes_only=True)  # validates the index and its shards
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files += [os.path.join(os.path.dirname(path), s) for s in shards]
    return files_sha256(files, block)


def files_sha256(files: Sequence[str], block: int = 1 << 20) -> str:
    """sha256 over the bytes of `files`, one after the other, read in blocks."""
    import hashlib
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            while chunk := f.read(block):
                digest.update(chunk)
    return digest.hexdigest()
