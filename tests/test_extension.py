"""sar_fast._C: the nearest_code op (CPU kernel, CUDA kernel when a GPU is present)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sar_fast._C_loader import cuda_compiled, has_extension, load_extension, nearest_code

if not has_extension():  # a failure, not a skip: CI must never pass without the extension
    pytest.fail("sar_fast._C is not built: pip install --no-build-isolation -e . "
                "(or python setup.py build_ext --inplace)", pytrace=False)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
if torch.cuda.is_available() and not cuda_compiled():  # would skip every CUDA test below silently
    pytest.fail("a CUDA device is present but sar_fast._C was built without CUDA kernels: rebuild it with a "
                "CUDA toolkit (CUDA_HOME set, SAR_FAST_NO_CUDA unset)", pytrace=False)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator: new inputs every run; the seed is printed on failure."""
    generator = torch.Generator()
    print(f"input seed: {generator.seed()}")
    return generator


def squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Exact-ish float64 [N, V] squared distances of the (already rounded) inputs."""
    x64, c64 = x.double().cpu(), codebook.double().cpu()
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def assert_nearest(index: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor) -> None:
    """index must pick a row whose true distance is the minimum up to fp32 rounding, and the
    exact float64 argmin wherever the best code is separated from the runner-up."""
    assert index.dtype == torch.int64 and index.shape == (x.shape[0],)
    index = index.cpu()
    dist = squared_distances(x, codebook)
    best, reference = dist.min(dim=1)
    chosen = dist.gather(1, index[:, None]).squeeze(1)
    scale = x.double().cpu().pow(2).sum(1) + codebook.double().cpu().pow(2).sum(1).max()
    tol = 1e-5 * scale
    assert bool((chosen <= best + tol).all()), (chosen - best).max()
    if dist.shape[1] > 1:
        runner_up = dist.topk(2, dim=1, largest=False).values[:, 1]
        separated = runner_up - best > 2 * tol
        assert torch.equal(index[separated], reference[separated])


def integer_valued(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    # Small integers are exact in every supported dtype and their distances exact in fp32,
    # so ties are real ties and the lowest-index rule can be checked exactly.
    return torch.randint(-2, 3, shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [3, 32])
@pytest.mark.parametrize("num_codes", [1, 5, 257])
@pytest.mark.parametrize("num_rows", [1, 37])
def test_matches_float64_reference(
    num_rows: int, num_codes: int, dim: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    x = torch.randn(num_rows, dim, generator=gen).to(dtype)
    codebook = torch.randn(num_codes, dim, generator=gen).to(dtype)
    assert_nearest(nearest_code(x, codebook), x, codebook)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_pick_lowest_index(dtype: torch.dtype, gen: torch.Generator) -> None:
    x = integer_valued((37, 3), dtype, gen)
    codebook = integer_valued((257, 3), dtype, gen)  # 125 distinct vectors: many duplicates
    expected = squared_distances(x, codebook).argmin(dim=1)  # first minimum on ties
    assert torch.equal(nearest_code(x, codebook), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_codebook_rows(dtype: torch.dtype, gen: torch.Generator) -> None:
    codebook = torch.randn(50, 32, generator=gen).to(dtype)
    low, high = torch.tensor([3, 10, 20]), torch.tensor([40, 11, 49])
    codebook[high] = codebook[low]
    x = torch.cat([codebook[high], codebook[low]])  # exact copies of the duplicated rows
    assert torch.equal(nearest_code(x, codebook), torch.cat([low, low]))


def test_parallel_chunks_and_partial_row_blocks(gen: torch.Generator) -> None:
    # Enough rows for several parallel_for chunks whose edges fall inside a row block.
    x = torch.randn(2999, 8, generator=gen)
    codebook = torch.randn(64, 8, generator=gen)
    assert_nearest(nearest_code(x, codebook), x, codebook)


def test_non_contiguous_inputs(gen: torch.Generator) -> None:
    x = torch.randn(32, 41, generator=gen).t()  # [41, 32], column-major
    codebook = torch.randn(90, 64, generator=gen)[::3, ::2]  # [30, 32], strided
    assert not x.is_contiguous() and not codebook.is_contiguous()
    assert torch.equal(nearest_code(x, codebook), nearest_code(x.contiguous(), codebook.contiguous()))


@settings(deadline=None, max_examples=40)
@given(
    num_rows=st.integers(1, 40),
    num_codes=st.integers(1, 40),
    dim=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_integer_inputs_exact(num_rows: int, num_codes: int, dim: int, dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = integer_valued((num_rows, dim), dtype, gen)
    codebook = integer_valued((num_codes, dim), dtype, gen)
    expected = squared_distances(x, codebook).argmin(dim=1)
    assert torch.equal(nearest_code(x, codebook), expected)


BAD_INPUTS = [
    pytest.param(lambda: (torch.randn(4), torch.randn(5, 4)), ValueError, "x must be 2-D", id="x-rank"),
    pytest.param(lambda: (torch.randn(3, 4), torch.randn(2, 5, 4)), ValueError, "codebook must be 2-D", id="codebook-rank"),
    pytest.param(lambda: (torch.randn(3, 4), torch.randn(5, 4).half()), TypeError, "must match x dtype", id="dtype-mismatch"),
    pytest.param(lambda: (torch.randn(3, 4), torch.randn(5, 6)), ValueError, "x has C=4 features per row but codebook has C=6", id="dim-mismatch"),
    pytest.param(lambda: (torch.randn(0, 4), torch.randn(5, 4)), ValueError, "x must be non-empty", id="empty-x"),
    pytest.param(lambda: (torch.randn(3, 0), torch.randn(5, 0)), ValueError, "x must be non-empty", id="empty-dim"),
    pytest.param(lambda: (torch.randn(3, 4), torch.randn(0, 4)), ValueError, "codebook must have at least one row", id="empty-codebook"),
    pytest.param(lambda: (torch.ones(3, 4, dtype=torch.int32), torch.ones(5, 4, dtype=torch.int32)), TypeError, "float32, float16 or bfloat16", id="integer"),
    pytest.param(lambda: (torch.randn(3, 4).double(), torch.randn(5, 4).double()), TypeError, "float32, float16 or bfloat16", id="float64"),
]


@pytest.mark.parametrize("make_inputs, error, message", BAD_INPUTS)
@pytest.mark.parametrize("entry", ["wrapper", "torch.ops"])
def test_bad_input_raises(entry: str, make_inputs, error: type, message: str) -> None:
    # The Python wrapper and the raw operator (C++ checks) reject the same inputs alike.
    op = nearest_code if entry == "wrapper" else torch.ops.sar_fast.nearest_code
    with pytest.raises(error, match=message):
        op(*make_inputs())


def test_wrapper_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="codebook must be a torch.Tensor"):
        nearest_code(torch.randn(3, 4), [[0.0] * 4])


def test_operator_traces_with_fake_tensors() -> None:
    # Schema, fake (meta) kernel and AOT dispatch consistency, as torch.compile needs them.
    load_extension()
    x, codebook = torch.randn(9, 5), torch.randn(7, 5)
    torch.library.opcheck(torch.ops.sar_fast.nearest_code.default, (x, codebook))
    compiled = torch.compile(lambda a, b: torch.ops.sar_fast.nearest_code(a, b) + 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, codebook), nearest_code(x, codebook) + 1)


def test_missing_extension_error_names_the_build_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sar_fast._C_loader as loader

    def fail_import(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(loader, "_extension", None)
    monkeypatch.setattr(loader, "_import_error", None)
    monkeypatch.setattr(loader.importlib, "import_module", fail_import)
    assert not loader.has_extension() and not loader.cuda_compiled()
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \.") as info:
        loader.load_extension()
    assert "python setup.py build_ext --inplace" in str(info.value)
    with pytest.raises(ImportError, match="sar_fast._C"):
        loader.nearest_code(torch.randn(3, 2), torch.randn(4, 2))


def test_cuda_compiled_flag_is_bool() -> None:
    assert isinstance(load_extension().cuda_compiled(), bool)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [3, 8, 32, 100, 200])
def test_cuda_matches_cpu(dim: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    # 300 rows: several thread blocks; 1000 codes: several shared-memory tiles for every
    # padded width; dim 200 takes the wide (no-register) kernel.
    x = torch.randn(300, dim, generator=gen).to(dtype)
    codebook = torch.randn(1000, dim, generator=gen).to(dtype)
    on_gpu = nearest_code(x.cuda(), codebook.cuda())
    assert on_gpu.device.type == "cuda"
    assert_nearest(on_gpu, x, codebook)
    agree = (on_gpu.cpu() == nearest_code(x, codebook)).float().mean().item()
    assert agree > 0.99  # differences only on fp32 near-ties (FMA contraction on the GPU)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [3, 130])
def test_cuda_exact_ties(dim: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    x = integer_valued((333, dim), dtype, gen)
    codebook = integer_valued((700, dim), dtype, gen)
    expected = squared_distances(x, codebook).argmin(dim=1)
    assert torch.equal(nearest_code(x.cuda(), codebook.cuda()).cpu(), expected)
    assert torch.equal(nearest_code(x, codebook), expected)


@needs_cuda
def test_cuda_rejects_mixed_devices() -> None:
    with pytest.raises(ValueError, match="same device"):
        torch.ops.sar_fast.nearest_code(torch.randn(3, 4, device="cuda"), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same device"):
        nearest_code(torch.randn(3, 4), torch.randn(5, 4, device="cuda"))
