"""Sample-keyed randomness (sar_fast.rng): label dropout and drop-path depend on
(seed, step, global row), not on the rank or the micro-batch a row lands in."""
import pytest
import torch

from sar_fast.models import ScaleAR, preset_config
from sar_fast.rng import SampleKey, keyed_uniform


def test_keyed_uniform_is_a_function_of_the_key_and_row():
    rows = torch.arange(200_000)
    u = keyed_uniform(3, 17, 1, rows)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    # roughly uniform: every tenth of [0, 1) holds about a tenth of the draws
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.005
    # a row's value does not depend on which other rows are drawn with it
    pick = torch.tensor([5, 199_999, 0, 77])
    assert torch.equal(keyed_uniform(3, 17, 1, pick), u[pick])
    # every part of the key matters; neighbouring rows are uncorrelated
    for other in (keyed_uniform(4, 17, 1, rows), keyed_uniform(3, 18, 1, rows), keyed_uniform(3, 17, 2, rows),
                  keyed_uniform(3 + 2**32, 17, 1, rows)):
        assert (other == u).float().mean() < 1e-3
        assert abs(torch.corrcoef(torch.stack((u, other)))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack((u[:-1], u[1:])))[0, 1]) < 0.01
    assert not torch.equal(keyed_uniform(1, 2, 3, rows[:100]), keyed_uniform(1, 3, 2, rows[:100]))


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="must be ints in"):
        keyed_uniform(-1, 0, 0, torch.arange(3))
    with pytest.raises(TypeError, match="rows must be an integer tensor"):
        keyed_uniform(0, 0, 0, torch.rand(3))


def _tiny(cond_drop=0.5, drop_path=0.4):
    torch.manual_seed(0)
    return ScaleAR(preset_config("flexvar-tiny", depth=3, cond_drop_rate=cond_drop, drop_path_rate=drop_path))


def test_model_noise_follows_the_rows_not_the_batch_split():
    """A batch of 12 rows run whole or in two pieces (as on two ranks) gives the same
    per-row outputs, label dropout and drop-path included; rows differ from each other."""
    model = _tiny().train()
    B, sched = 12, (1, 2, 3)
    labels = torch.randint(0, 10, (B,))
    x = torch.randn(B, 13, model.code_dim)
    rows = torch.arange(B)
    model.set_sample_key(SampleKey(7, 3, rows))
    whole = model(labels, x, sched, return_hidden=True)
    parts = []
    for r in range(2):  # rank r of 2 holds rows r, r + 2, ...
        mine = rows[r::2]
        model.set_sample_key(SampleKey(7, 3, mine))
        parts.append((mine, model(labels[mine], x[mine], sched, return_hidden=True)))
    for mine, out in parts:
        torch.testing.assert_close(out, whole[mine], rtol=1e-5, atol=1e-5)
    # the noise is on: the same rows under another step differ, and label drops vary by row
    model.set_sample_key(SampleKey(7, 4, rows))
    assert not torch.allclose(model(labels, x, sched, return_hidden=True), whole)
    model.set_sample_key(SampleKey(7, 3, torch.arange(1000)))
    cond = model.class_condition(torch.zeros(1000, dtype=torch.long))
    dropped = (cond == model.class_emb.weight[model.num_classes]).all(dim=1).float()
    assert 0.45 < dropped.mean() < 0.55


def test_a_stacked_null_class_batch_repeats_the_rows_and_wrong_sizes_fail():
    model = _tiny(cond_drop=0.0).train()
    rows = torch.arange(4)
    model.set_sample_key(SampleKey(0, 0, rows))
    u = model._uniforms(8, (5,), torch.device("cpu"))[:, 0]
    assert torch.equal(u[:4], u[4:]) and torch.equal(u[:4], keyed_uniform(0, 0, 5, rows))
    with pytest.raises(ValueError, match="the sample key has 4 rows but the batch 6"):
        model._uniforms(6, (5,), torch.device("cpu"))


def test_streams_are_pinned():
    """Values computed before the streams moved into sar_fast.rng (from sampling.py, sar.py and
    evaluate.py): a changed formula changes the draws of existing runs and evaluation sets."""
    import random

    from sar_fast import rng
    assert (rng.STREAM_SSR, rng.STREAM_MODEL, rng.STREAM_ROLLOUT) == (1, 2, 3)
    assert (rng.STREAM_LABEL_DROP, rng.STREAM_DROP_PATH) == (1, 1_000)
    u = rng.sample_keyed_uniform(3, 11, (rng.STREAM_SSR, 2), torch.tensor([0, 5, 2**40 + 7]), (2,))
    assert u.tolist() == [[0.4048338848865415, 0.6873206997336284], [0.643247435479533, 0.6917159622390333],
                          [0.34753250649010525, 0.2014887803450488]]
    assert rng.sample_keyed_uniform(1, 0, rng.STREAM_ROLLOUT, slice(0, 3)).tolist() == \
        [0.4299700289302514, 0.4263942410328234, 0.048207545259570606]
    assert keyed_uniform(7, 3, 1000, torch.tensor([[0, 1], [9, 123456]])).tolist() == \
        [[0.9482837319374084, 0.5533895492553711], [0.5637385845184326, 0.8887026906013489]]
    assert (rng.image_seed(0, 3, 5), rng.image_seed(12, 999, 49)) == (2011135173851325426, 6408315871838734770)
    assert rng.image_uniforms(1, 2, 3, 4).tolist() == \
        [0.5387659879071183, 0.296882180937018, 0.33164108149111793, 0.39032611314713084]
    assert rng.image_identity(23, 10) == (3, 2)
    gen = torch.Generator().manual_seed(rng.official_scale_seed(5, 17, 2))
    assert torch.rand(3, generator=gen, dtype=torch.float64).tolist() == \
        [0.2620935320465203, 0.5057670937464599, 0.00222545302176691]
    assert random.Random(rng.transition_seed(5, 17)).randrange(9) == 2
    assert rng.schedule_seed(5, 17) == 5 * 1_000_003 + 17
