"""Naive float64 loops: independent restatements of the semantics the references claim."""
import math

import numpy as np
import torch


def cubic_weights(t: float, A: float = -0.75) -> list[float]:
    def w(x):
        x = abs(x)
        if x <= 1:
            return ((A + 2) * x - (A + 3)) * x * x + 1
        if x < 2:
            return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
        return 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def bicubic(img: np.ndarray, out: int) -> np.ndarray:
    """[C, h, w] -> [C, out, out]: PyTorch bicubic, align_corners=False, clamped borders."""
    C, h, w = img.shape
    res = np.zeros((C, out, out))
    def taps(n_in, dst):
        src = (dst + 0.5) * n_in / out - 0.5
        i0 = math.floor(src)
        return [min(max(i0 - 1 + j, 0), n_in - 1) for j in range(4)], cubic_weights(src - i0)
    for y in range(out):
        ys, wy = taps(h, y)
        for x in range(out):
            xs, wx = taps(w, x)
            for a in range(4):
                for b in range(4):
                    res[:, y, x] += wy[a] * wx[b] * img[:, ys[a], xs[b]]
    return res


def area(img: np.ndarray, out: int) -> np.ndarray:
    """[C, h, w] -> [C, out, out]: adaptive average pooling (F.interpolate mode='area')."""
    C, h, w = img.shape
    res = np.zeros((C, out, out))
    for y in range(out):
        y0, y1 = (y * h) // out, -((-(y + 1) * h) // out)
        for x in range(out):
            x0, x1 = (x * w) // out, -((-(x + 1) * w) // out)
            res[:, y, x] = img[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return res


def attention(q, k, v, scale_lens, softmax_scale):
    """Per query, softmax over the keys of its scale and earlier ones."""
    q, k, v = (t.double() for t in (q, k, v))
    B, H, L, D = q.shape
    ids = [i for i, n in enumerate(scale_lens) for _ in range(n)]
    out = torch.zeros_like(q)
    for i in range(L):
        allowed = [j for j in range(L) if ids[j] <= ids[i]]
        s = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, allowed]) * softmax_scale
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", s.softmax(-1), v[:, :, allowed])
    return out


def cross_entropy(logits, target, weight, smoothing, ignore_index):
    """Per token: w * [(1 - eps) * -log p_t + eps * mean_j -log p_j], 0 where ignored."""
    logp = logits.double().log_softmax(-1)
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for i in range(logits.shape[0]):
        t = int(target[i])
        if t == ignore_index:
            continue
        ce = (1 - smoothing) * -logp[i, t] - smoothing * logp[i].mean()
        out[i] = ce * (1.0 if weight is None else float(weight[i]))
    return out


def nearest(z: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Brute force: first index of the smallest squared distance."""
    out = np.zeros(len(z), dtype=np.int64)
    for n, row in enumerate(z):
        d = ((book - row) ** 2).sum(1)
        out[n] = int(np.argmin(d))
    return out


def padded_block_causal_attention(q, k, v, scale_lens, pad: int, softmax_scale=None, cached: bool = False):
    """Row by row in float64: a real row of scale s takes a softmax over the keys of scales
    <= s (cached: over every key), each of the last `pad` rows over key 0 alone.
    q, k, v [B, H, *, D] -> [B, H, Lq, D]; differentiable (autograd gives the gradients)."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    end, ends = 0, []  # keys visible to each real row: every key up to the end of its own scale
    for n in scale_lens or ():
        end += n
        ends += [end] * n
    rows = []
    for i in range(Lq):
        if i >= Lq - pad:
            visible = 1
        else:
            visible = k.shape[2] if cached else ends[i]
        scores = (q[:, :, i:i + 1] @ k[:, :, :visible].transpose(-1, -2)) * scale  # B, H, 1, n
        weights = torch.softmax(scores, dim=-1)
        rows.append(weights @ v[:, :, :visible])
    return torch.cat(rows, dim=2)
