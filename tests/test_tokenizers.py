"""Tokenizers: parity with the original FlexVAR (LlamaGen VQ-16) and VAR VQVAE code through
golden fixtures (tests/data/README.md), shapes for other schedules, checkpoint loading,
input validation."""
import os

import pytest
import torch

from conftest import DATA
from sar_fast.models.checkpoint import CheckpointError
from sar_fast.models.tokenizers import FlexVQ16, VARVQVAE, detect_tokenizer_kind, load_tokenizer

KINDS = {"flexvq": FlexVQ16, "varvq": VARVQVAE}
TOL = 1e-5


def _golden(name):
    return torch.load(os.path.join(DATA, f"golden_{name}.pt"), weights_only=True)


def _max_err(got, want):
    """Max abs error, relative to the magnitude where values exceed 1."""
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


def _tiny(cls, **kw):
    torch.manual_seed(0)
    model = cls(vocab_size=53, Cvae=8, ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, norm_groups=4,
                **({"z_channels": 12} if cls is FlexVQ16 else {}), **kw).eval()
    with torch.no_grad():  # a codebook on the latent's scale, so VAR's residual scales all matter
        model.quantize.embedding.weight.normal_(0, 0.3)
    return model


def _images(B=2, H=64, W=64):
    return torch.rand(B, 3, H, W) * 2 - 1


# ----------------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_golden_parity_with_the_original_code(name):
    g = _golden(name)
    cls = KINDS[name]
    assert g["min_rel_margin"] > 5e-4  # no near-ties in the nearest-code searches
    model = cls.from_checkpoint(g["state_dict"], norm_groups=g["config"]["norm_groups"])
    assert type(model) is cls and model.vocab_size == g["config"]["vocab_size"] and model.Cvae == g["config"]["Cvae"]

    latent = model.encode_latent(g["images"])
    assert _max_err(latent, g["latent"]) <= TOL

    cases = (("schedule", "codes", "tf_inputs"), ("schedule_alt", "codes_alt", "tf_inputs_alt"))
    for sched, codes_key, tf_key in cases:
        schedule = tuple(g[sched])
        codes = model.encode(g["images"], schedule)
        assert [c.shape for c in codes] == [c.shape for c in g[codes_key]]
        for got, want in zip(codes, g[codes_key]):
            assert got.dtype == torch.int64 and torch.equal(got, want), f"{name} {schedule}: codes differ"
        tf = model.tf_inputs(codes)
        assert tf.shape == g[tf_key].shape
        assert _max_err(tf, g[tf_key]) <= TOL
        # the concatenated form gives the same
        assert torch.equal(model.tf_inputs(torch.cat(codes, 1), schedule), tf)

    dec_latent = model.codes_to_latent(g["codes"])
    assert _max_err(dec_latent, g["decode_latent"]) <= TOL
    raw = model.decode_latent(dec_latent, raw=True)
    assert _max_err(raw, g["decoded_raw"]) <= TOL
    img = model.decode(g["codes"])
    assert _max_err(img, (g["decoded_raw"].clamp(-1, 1) + 1) / 2) <= TOL
    assert img.min() >= 0 and img.max() <= 1
    if name == "varvq":  # schedule (2, 4, 5): scale 1 sits exactly between two Phi ticks
        assert _max_err(model.codes_to_latent(g["codes_alt"]), g["decode_latent_alt"]) <= TOL


@pytest.mark.parametrize("backend", ["reference", "kernel"])
@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_golden_tf_inputs_on_every_backend(name, backend):
    # FlexVAR's codes path runs the Triton scale-shift kernel (interpreter on CPU)
    from sar_fast import ops
    from conftest import KERNEL_DEVICE
    g = _golden(name)
    device = KERNEL_DEVICE if backend == "kernel" else "cpu"
    model = KINDS[name].from_checkpoint(g["state_dict"], norm_groups=4).to(device)
    with ops.use_backend(backend):
        for codes_key, tf_key in (("codes", "tf_inputs"), ("codes_alt", "tf_inputs_alt")):
            codes = [c.to(device) for c in g[codes_key]]
            assert _max_err(model.tf_inputs(codes).cpu(), g[tf_key]) <= TOL


@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_golden_state_dict_loads_strictly_with_plain_load_state_dict(name):
    g = _golden(name)
    model = KINDS[name](**g["config"]) if name == "flexvq" else VARVQVAE(**g["config"], usage_scales=4)
    model.load_state_dict(g["state_dict"], strict=True)
    assert sorted(model.state_dict()) == sorted(g["state_dict"])


@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_default_config_has_the_released_checkpoint_layout(name):
    # official_layout: (key, shape) of every entry of the original module in its released
    # config (FlexVAE.pth / vae_ch160v4096z32.pth), recorded by the fixture script.
    want = {k: tuple(shape) for k, shape in _golden(name)["official_layout"]}
    with torch.device("meta"):
        model = KINDS[name]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert model.downsample == 16


def test_flexvq_codebook_is_normalised_and_var_codebook_is_raw():
    flex, var = _tiny(FlexVQ16), _tiny(VARVQVAE)
    assert torch.allclose(flex.codebook().norm(dim=1), torch.ones(53))
    assert torch.allclose(flex.codebook(), torch.nn.functional.normalize(flex.quantize.embedding.weight, dim=1))
    assert var.codebook() is var.quantize.embedding.weight


def test_var_phi_choice_matches_var_ticks():
    # which of the 4 shared Phi convs VAR uses at each scale (read off the original code)
    phis = _tiny(VARVQVAE).quantize.quant_resi
    expected = {2: [0, 3], 3: [0, 2, 3], 4: [0, 1, 2, 3], 5: [0, 1, 2, 2, 3],
                10: [0, 0, 1, 1, 1, 2, 2, 3, 3, 3], 13: [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]}
    for n, ids in expected.items():
        assert [phis.index_for(i, n) for i in range(n)] == ids, n
    assert phis.index_for(0, 1) == 3  # one scale: the full-resolution Phi
    three = _tiny(VARVQVAE, share_quant_resi=3).quantize.quant_resi
    assert [three.index_for(i, 10) for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------- shapes, schedules
@pytest.mark.parametrize("cls", [FlexVQ16, VARVQVAE])
@pytest.mark.parametrize("schedule", [(4,), (1, 4), (2, 3, 4), (1, 2, 3, 4)])
def test_encode_decode_shapes_for_other_schedules(cls, schedule):
    model = _tiny(cls)
    images = _images(B=2)
    codes = model.encode(images, schedule)
    assert [tuple(c.shape) for c in codes] == [(2, s * s) for s in schedule]
    assert all(c.dtype == torch.int64 and c.min() >= 0 and c.max() < 53 for c in codes)
    L = sum(s * s for s in schedule)
    tf = model.tf_inputs(codes)
    assert tf.shape == (2, L - schedule[0] ** 2, 8) and torch.isfinite(tf).all()
    img = model.decode(codes)
    assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(model.decode(torch.cat(codes, 1), schedule), img)


def test_flexvq_decode_uses_only_the_last_scale():
    model = _tiny(FlexVQ16)
    codes = model.encode(_images(), (1, 2, 4))
    img = model.decode(codes)
    assert torch.equal(model.decode(codes[-1]), img)
    other = [torch.randint(0, 53, c.shape) for c in codes[:-1]] + [codes[-1]]
    assert torch.equal(model.decode(other), img)


def test_flexvq_scales_are_independent_and_var_scales_are_residual():
    images = _images()
    flex = _tiny(FlexVQ16)
    # FlexVAR: a scale's codes do not depend on which other scales are in the schedule
    assert torch.equal(flex.encode(images, (1, 2, 4))[1], flex.encode(images, (2, 4))[0])
    var = _tiny(VARVQVAE)
    full, alone = var.encode(images, (1, 2, 4)), var.encode(images, (4,))
    assert not torch.equal(full[-1], alone[0])  # VAR quantises the residual after coarser scales


def test_non_square_images_give_a_latent_but_no_codes():
    model = _tiny(FlexVQ16)
    assert model.encode_latent(_images(H=64, W=80)).shape == (2, 8, 4, 5)
    with pytest.raises(ValueError, match="square"):
        model.encode(_images(H=64, W=80), (1, 2, 4))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_load_tokenizer_infers_the_kind_from_file(name, tmp_path):
    g = _golden(name)
    path = tmp_path / "vae.pth"
    # FlexVAE.pth wraps the weights as {'model': ...}; VAR's file is flat
    torch.save({"model": g["state_dict"], "steps": 7} if name == "flexvq" else g["state_dict"], path)
    model = load_tokenizer(path, norm_groups=4)
    assert type(model) is KINDS[name] and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert detect_tokenizer_kind(g["state_dict"]) == ("flexvar" if name == "flexvq" else "var")
    codes = model.encode(g["images"], tuple(g["schedule"]))
    assert all(torch.equal(a, b) for a, b in zip(codes, g["codes"]))
    wrong = "var" if name == "flexvq" else "flexvar"
    with pytest.raises(CheckpointError, match=f"kind='{wrong}'"):
        load_tokenizer(path, kind=wrong, norm_groups=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_tokenizer(path, kind="vqgan")


@pytest.mark.parametrize("name", ["flexvq", "varvq"])
def test_from_checkpoint_lists_missing_unexpected_and_misshaped_keys(name):
    g = _golden(name)
    cls = KINDS[name]
    sd = dict(g["state_dict"])
    del sd["decoder.conv_out.bias"], sd["post_quant_conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(3)
    sd["quant_conv.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as info:
        cls.from_checkpoint(sd, norm_groups=4)
    msg = str(info.value)
    assert "missing keys (2)" in msg and "decoder.conv_out.bias" in msg and "post_quant_conv.weight" in msg
    assert "unexpected keys (1): decoder.extra.weight" in msg
    assert "shape mismatches (1): quant_conv.bias: checkpoint (5,) vs model (8,)" in msg


def test_from_checkpoint_rejects_the_other_tokenizer_and_non_tokenizers():
    with pytest.raises(CheckpointError, match="not a LlamaGen VQ"):
        FlexVQ16.from_checkpoint(_golden("varvq")["state_dict"], norm_groups=4)
    with pytest.raises(CheckpointError, match="not a VAR VQVAE"):
        VARVQVAE.from_checkpoint(_golden("flexvq")["state_dict"], norm_groups=4)
    with pytest.raises(CheckpointError, match="cannot tell the tokenizer kind"):
        load_tokenizer({"head.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="path_or_state_dict"):
        FlexVQ16.from_checkpoint(3)


def test_var_usage_buffer_takes_the_checkpoint_shape():
    g = _golden("varvq")
    model = VARVQVAE(**g["config"])  # built for 10 scales; the fixture's buffer has 4
    model.load_state_dict(g["state_dict"], strict=True)
    assert torch.equal(model.quantize.ema_vocab_hit_SV, g["state_dict"]["quantize.ema_vocab_hit_SV"])


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("cls", [FlexVQ16, VARVQVAE])
def test_bad_images_are_rejected(cls):
    model = _tiny(cls)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        model.encode(torch.rand(3, 64, 64), (1, 4))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        model.encode(torch.rand(2, 4, 64, 64), (1, 4))
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model.encode(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), (1, 4))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model.encode_latent([[0.0]])
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(_images(H=72, W=72), (1, 4))


@pytest.mark.parametrize("cls", [FlexVQ16, VARVQVAE])
def test_bad_schedules_are_rejected(cls):
    model = _tiny(cls)
    images = _images()
    with pytest.raises(ValueError, match="must end at the latent side 4"):
        model.encode(images, (1, 2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        model.encode(images, (2, 1, 4))
    with pytest.raises(TypeError, match="schedule"):
        model.encode(images, 4)


@pytest.mark.parametrize("cls", [FlexVQ16, VARVQVAE])
def test_bad_codes_are_rejected(cls):
    model = _tiny(cls)
    codes = model.encode(_images(), (1, 2, 4))
    high = [c.clone() for c in codes]
    high[1][0, 0] = 53
    low = [c.clone() for c in codes]
    low[0][1, 0] = -1
    for fn in (model.decode, model.tf_inputs):
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 53\).*\[\d+, 53\]"):
            fn(high)
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 53\).*\[-1, "):
            fn(low)
        with pytest.raises(TypeError, match="codes must be int64 or int32"):
            fn([c.float() for c in codes])
        with pytest.raises(ValueError, match=r"codes\[1\] must be \[B, s\*s\]"):
            fn([codes[0], codes[1][:, :3], codes[2]])
        with pytest.raises(ValueError, match="schedule of the codes must be strictly increasing"):
            fn([codes[1], codes[0]])
        with pytest.raises(TypeError, match="codes must be a"):
            fn([])
    flat = torch.cat(codes, 1)
    with pytest.raises(ValueError, match="need the schedule"):
        model.tf_inputs(flat)
    with pytest.raises(ValueError, match="has 21"):
        model.tf_inputs(flat[:, 1:], (1, 2, 4))
    with pytest.raises(ValueError, match="does not match the codes"):
        model.tf_inputs(codes, (1, 3, 4))
    with pytest.raises(ValueError, match=r"latent must be \[B, 8, h, w\]"):
        model.decode_latent(torch.zeros(2, 7, 4, 4))


def test_bad_constructor_arguments_are_rejected():
    with pytest.raises(ValueError, match="norm_groups=4 must divide"):
        FlexVQ16(vocab_size=5, Cvae=4, z_channels=4, ch=6, ch_mult=(1,), norm_groups=4)
    with pytest.raises(ValueError, match="ch_mult"):
        VARVQVAE(ch_mult=())
    with pytest.raises(ValueError, match="share_quant_resi"):
        VARVQVAE(share_quant_resi=0)
    with pytest.raises(ValueError, match="vocab_size"):
        FlexVQ16(vocab_size=0)
