"""ImageNet sample metrics through torch-fidelity (pip install 'sar_fast[eval]'): FID, Inception
Score and precision/recall (k = 3), all on torch-fidelity's port of the TF-Inception that ADM's
evaluator uses, so FID against ADM's reference statistics is comparable to published numbers.

The reference is either ADM's `VIRTUAL_imagenet256_labeled.npz` (FID from its `mu`/`sigma`,
precision/recall from its `arr_0` images) or a folder of real images; the reference features
and statistics are cached (keyed by the reference files and the weights) so later runs skip them.
sFID is not computed: torch-fidelity has no spatial-feature FID (ADM's evaluator does; run it
on the written samples.npz if needed).

The weights are never downloaded here: they come from a path or torch-fidelity's cache file,
checked by `resolve_inception_weights` before any sampling starts.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from ..models.checkpoint import files_sha256
from ..files import atomic_write
from ..safe_load import load_file

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def require_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("the ImageNet metrics need torch-fidelity: pip install torch-fidelity "
                          "(or pip install 'sar_fast[eval]')") from e
    return torch_fidelity


def cached_weights_path() -> str:
    """Where torch-fidelity's own download would put the weights (torch hub's checkpoints dir)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)


def resolve_inception_weights(path: str | None) -> str:
    """The weights file to use: `path` if given, else torch-fidelity's cached copy; a
    FileNotFoundError naming the file and where to put it when neither exists."""
    help_text = (f"the metrics need torch-fidelity's TF-Inception weights {INCEPTION_WEIGHTS_FILE} "
                 f"(download {INCEPTION_WEIGHTS_URL} on a machine with internet), then pass "
                 f"--inception /path/to/{INCEPTION_WEIGHTS_FILE} or put the file at {cached_weights_path()}")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file; {help_text}")
        return path
    cached = cached_weights_path()
    if not os.path.isfile(cached):
        raise FileNotFoundError(f"Inception weights not found: {help_text}")
    return cached


def check_reference(path: str | None) -> str:
    """A reference that exists: an .npz with mu/sigma and/or arr_0, or a folder of images."""
    if not path:
        raise ValueError("--reference is required for the ImageNet metrics: ADM's VIRTUAL_imagenet256_labeled.npz "
                         "or a folder of real images")
    if os.path.isdir(path):
        if not _list_images(path):
            raise ValueError(f"--reference {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        return path
    if not os.path.isfile(path) or not path.endswith(".npz"):
        raise FileNotFoundError(f"--reference {path}: expected an existing .npz (ADM's reference batch) "
                                "or a folder of real images")
    with np.load(path) as ref:
        keys = set(ref.files)
    if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
        raise ValueError(f"--reference {path}: the npz needs 'mu' and 'sigma' (statistics) or 'arr_0' "
                         f"(uint8 images [N, H, W, 3]); it has {sorted(keys)}")
    return path


def _list_images(folder: str) -> list[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def load_image_folder(folder: str, side: int) -> np.ndarray:
    """uint8 [N, side, side, 3]: every image of `folder` (recursively, sorted), RGB, centre
    cropped to a square and resized (bicubic) to side x side when it is not already."""
    from PIL import Image
    out = []
    for path in _list_images(folder):
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            if (w, h) != (side, side):
                crop = min(w, h)
                left, top = (w - crop) // 2, (h - crop) // 2
                img = img.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BICUBIC)
            out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)


class InceptionMetrics:
    """FID / IS / precision-recall of uint8 [N, H, W, 3] images against a reference."""

    def __init__(self, weights_path: str, device: torch.device | str = "cpu", batch_size: int = 64,
                 cache_dir: str | None = None):
        require_torch_fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )
        self.weights_path = weights_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        # torch-fidelity reads its weights with torch.load(weights_only=False): it gets a copy
        # written here of what safe_load accepted, never the user's file itself
        state = load_file(weights_path)
        with tempfile.TemporaryDirectory() as tmp:
            checked = os.path.join(tmp, INCEPTION_WEIGHTS_FILE)
            torch.save(state, checked)
            self.extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                         feature_extractor_weights_path=checked).to(self.device)
        self._weights_key: str | None = None

    @torch.no_grad()
    def features(self, images: np.ndarray, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """{'2048': pool features [N, 2048], 'logits_unbiased': [N, 1008]} (float32, CPU)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        out: dict[str, list[torch.Tensor]] = {"2048": [], "logits_unbiased": []}
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start:start + self.batch_size]).permute(0, 3, 1, 2).to(self.device)
            feats = self.extractor.convert_features_tuple_to_dict(self.extractor(batch))
            for key in out:
                out[key].append(feats[key].float().cpu())
            if progress is not None:
                progress(len(batch))
        return {k: torch.cat(v) for k, v in out.items()}

    def _cache_path(self, reference: str, side: int) -> str | None:
        if not self.cache_dir:
            return None
        if self._weights_key is None:
            self._weights_key = files_sha256([self.weights_path])[:16]
        digest = hashlib.sha256(f"{self._weights_key}|{side}".encode())
        files = _list_images(reference) if os.path.isdir(reference) else [reference]
        for f in files:
            st = os.stat(f)
            digest.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return os.path.join(self.cache_dir, f"inception_reference_{digest.hexdigest()[:24]}.npz")

    def reference_statistics(self, reference: str, side: int) -> dict[str, np.ndarray | None]:
        """{'mu', 'sigma', 'features' (or None when the npz has statistics only)}, cached."""
        from torch_fidelity.metric_fid import fid_features_to_statistics
        cache = self._cache_path(reference, side)
        if cache and os.path.isfile(cache):
            with np.load(cache) as c:
                features = c["features"] if "features" in c.files else None
                return {"mu": c["mu"], "sigma": c["sigma"], "features": features}
        stats: dict[str, np.ndarray | None] = {"mu": None, "sigma": None, "features": None}
        if os.path.isdir(reference):
            images = load_image_folder(reference, side)
        else:
            with np.load(reference) as ref:
                if "mu" in ref.files and "sigma" in ref.files:
                    stats["mu"], stats["sigma"] = ref["mu"].astype(np.float64), ref["sigma"].astype(np.float64)
                images = ref["arr_0"] if "arr_0" in ref.files else None
        if images is not None:
            feats = self.features(images)["2048"]
            stats["features"] = feats.numpy()
            if stats["mu"] is None:
                computed = fid_features_to_statistics(feats)
                stats["mu"], stats["sigma"] = computed["mu"].astype(np.float64), computed["sigma"].astype(np.float64)
        if cache:
            os.makedirs(self.cache_dir, exist_ok=True)
            with atomic_write(cache) as f:
                np.savez(f, **{k: v for k, v in stats.items() if v is not None})
        return stats

    def compute(self, images: np.ndarray, reference: str, is_splits: int = 10,
                progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """{'fid', 'inception_score', 'inception_score_std', 'precision', 'recall'} (the last two
        only when the reference has images)."""
        from torch_fidelity.metric_fid import (
            fid_features_to_statistics,
            fid_statistics_to_metric,
        )
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric
        ref = self.reference_statistics(reference, images.shape[1])
        feats = self.features(images, progress)
        gen = {k: v.astype(np.float64) for k, v in fid_features_to_statistics(feats["2048"]).items()}
        if ref["mu"].shape != gen["mu"].shape:
            raise ValueError(f"reference statistics are {ref['mu'].shape[0]}-d, the Inception pool features "
                             f"{gen['mu'].shape[0]}-d: is {reference} an Inception (pool_3) reference?")
        fid = fid_statistics_to_metric(gen, {"mu": ref["mu"], "sigma": ref["sigma"]}, verbose=False)
        isc = isc_features_to_metric(feats["logits_unbiased"], splits=max(1, min(is_splits, len(images))))
        out = {"fid": fid["frechet_inception_distance"], "inception_score": isc["inception_score_mean"],
               "inception_score_std": isc["inception_score_std"]}
        if ref["features"] is not None:
            prc = prc_features_to_metric(feats["2048"], torch.from_numpy(ref["features"]), prc_neighborhood=3,
                                         prc_batch_size=10000, save_cpu_ram=True, verbose=False)
            out["precision"], out["recall"] = prc["precision"], prc["recall"]
        return out
