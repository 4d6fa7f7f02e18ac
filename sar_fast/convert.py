"""Convert model and tokenizer weights between `.pth` and safetensors.

    python -m sar_fast.convert FlexVARd16-epo179.pth FlexVARd16-epo179.safetensors
    python -m sar_fast.convert hf://FoundationVision/var/var_d16.pth var_d16.safetensors
    python -m sar_fast.convert model.safetensors.index.json model.pth

The direction follows the suffixes: a `.pth`/`.pt`/`.bin` (a pickle, read through
sar_fast.safe_load: nothing in it runs) to `.safetensors`, or a `.safetensors` / sharded
`*.safetensors.index.json` to `.pth`. IN may be an hf:// id (sar_fast.hub).

To safetensors: the weights are found where the official checkpoints keep them (FlexVAR/SAR
`ar-ckpt-*.pth`: trainer.var_wo_ddp; FlexVAE.pth: 'model'; flat state dicts such as
`FlexVARd16-epo179.pth`, `var_d16.pth`, `vae_ch160v4096z32.pth`: the file itself) and written
key for key, as stored: what the original code's load_state_dict expects. Everything else
(the training args stand-ins, epoch counters, optimiser state) is dropped and listed.
To .pth: a flat state dict, torch.save'd, that the original code loads with load_state_dict.
Round trips are exact: every key, dtype, shape and bit.

OUT is written to a temporary file beside it, then renamed; an existing OUT is refused unless
--force.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

import torch

from .cli import InputError, require_weights_file, run_main
from .hub import is_hub_id
from .models.checkpoint import (
    find_model_mapping,
    is_safetensors_path,
    read_checkpoint_file,
    write_pth,
    write_safetensors,
)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _kind(path: str) -> str | None:
    name = path.split("@")[0] if is_hub_id(path) else path
    if is_safetensors_path(name):
        return "safetensors"
    return "pth" if name.endswith(PICKLE_SUFFIXES) else None


def _where(obj: Any, mapping: Mapping) -> str:
    """Where in the checkpoint the weights were found, in words."""
    if mapping is obj:
        return "the file's top level (a flat state dict)"
    for path in (("trainer", "var_wo_ddp"), ("model",), ("state_dict",)):
        node = obj
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is mapping:
            return ".".join(path)
    return "a nested mapping"


def _dropped(obj: Any, mapping: Mapping) -> list[str]:
    """What a conversion leaves out: the non-tensor entries of the weights' mapping and every
    other entry of the containers above it."""
    out = [f"{k} ({type(v).__name__})" for k, v in mapping.items() if not isinstance(v, torch.Tensor)]

    def walk(node: Any, prefix: str) -> None:
        if node is mapping or not isinstance(node, Mapping):
            return
        for k, v in node.items():
            if v is mapping or (isinstance(v, Mapping) and _contains(v, mapping)):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k} ({type(v).__name__})")
    walk(obj, "")
    return out


def _contains(node: Mapping, target: Mapping) -> bool:
    return any(v is target or (isinstance(v, Mapping) and _contains(v, target)) for v in node.values())


def convert(src: str, dst: str, force: bool = False) -> str:
    """Convert `src` to `dst` (see the module doc); returns a one-paragraph report."""
    if not is_hub_id(src):  # a missing file or a folder is named as such, before the suffixes
        require_weights_file("IN", src)
    src_kind, dst_kind = _kind(src), _kind(dst)
    if is_hub_id(dst):
        raise InputError(f"error: OUT {dst}: an hf:// id cannot be written; expected a local .safetensors or .pth")
    if src_kind is None or dst_kind is None or src_kind == dst_kind:
        raise InputError(f"error: cannot convert {src} -> {dst}: expected a .pth/.pt/.bin and a .safetensors (either "
                         "way), or a *.safetensors.index.json to a .pth; the suffixes say the direction")
    if dst.endswith(".index.json"):
        raise InputError(f"error: OUT {dst}: sharded output is not written; name a single .safetensors file")
    if not is_hub_id(src) and os.path.abspath(src) == os.path.abspath(dst):
        raise InputError(f"error: IN and OUT are the same file: {src}")
    if os.path.isdir(dst):
        raise InputError(f"error: OUT {dst} is a directory; expected a file name")
    if os.path.exists(dst) and not force:
        raise InputError(f"error: OUT {dst} exists; pass --force to overwrite it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise InputError(f"error: OUT {dst}: no such directory {os.path.dirname(os.path.abspath(dst))}")
    obj = read_checkpoint_file(require_weights_file("IN", src))
    if dst_kind == "safetensors":
        mapping, _ = find_model_mapping(obj)
        tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
        bad = [k for k in tensors if not isinstance(k, str)]
        if bad:
            raise InputError(f"error: {src}: tensor names must be strings, got {bad[:5]}")
        write_safetensors(tensors, dst)
        dropped = _dropped(obj, mapping)
        return (f"wrote {dst}: {len(tensors)} tensors from {_where(obj, mapping)} of {src}"
                + (f"; dropped {len(dropped)} other entries: {', '.join(dropped[:12])}"
                   f"{' ...' if len(dropped) > 12 else ''}" if dropped else ""))
    write_pth(dict(obj), dst)
    return f"wrote {dst}: a flat state dict of {len(obj)} tensors from {src}"


def _parser() -> argparse.ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m sar_fast.convert", description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="IN", help="a .pth/.pt/.bin checkpoint, a .safetensors, a sharded "
                                             "*.safetensors.index.json, or an hf://OWNER/REPO/FILE[@REVISION] id")
    p.add_argument("dst", metavar="OUT", help="the .safetensors (from a .pth) or .pth (from safetensors) to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(convert(args.src, args.dst, force=args.force), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
