"""LogitAgreement and ReferenceLogits: the label-free measures of the demo (top-1 agreement, logit SQNR)."""

import ast
import math
from pathlib import Path

import pytest
import torch

from pytorch_quantizer.agreement import LogitAgreement, ReferenceLogits


def _random_logits(images: int = 24, classes: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(images, classes, generator=torch.Generator().manual_seed(seed)) * 3


def test_identical_logits_agree_fully_with_infinite_sqnr():
    ref = _random_logits()
    agreement = LogitAgreement()
    agreement.add(ref.clone(), ref)
    assert agreement.images == 24
    assert agreement.top1_agreement == 100.0
    assert agreement.sqnr_db == math.inf
    assert agreement.max_abs_diff == 0.0


def test_known_noise_gives_the_hand_computed_sqnr():
    # every reference logit is 2 and every error +-0.5: signal 4 * 10 * 2^2 = 160, noise 4 * 10 * 0.5^2 = 10
    ref = torch.full((4, 10), 2.0)
    noise = torch.tensor([0.5, -0.5]).repeat(4, 5)
    agreement = LogitAgreement()
    agreement.add(ref + noise, ref)
    assert agreement.sqnr_db == pytest.approx(10 * math.log10(160 / 10), abs=1e-12)  # 12.0412 dB
    assert agreement.max_abs_diff == pytest.approx(0.5)


def test_sqnr_matches_a_float64_computation_on_random_logits():
    ref = _random_logits(seed=1)
    q = ref + 0.01 * _random_logits(seed=2)
    agreement = LogitAgreement()
    agreement.add(q, ref)
    r, d = ref.double(), (q.double() - ref.double())
    expected = 10 * math.log10(float(r.square().sum() / d.square().sum()))
    assert agreement.sqnr_db == pytest.approx(expected, rel=1e-12)
    assert agreement.sqnr_db == pytest.approx(10 * math.log10(1 / 0.01**2), abs=0.2)  # noise 1 % of the signal


def test_argmax_flips_are_counted():
    ref = torch.zeros(5, 4)
    ref[torch.arange(5), torch.tensor([0, 1, 2, 3, 0])] = 1.0
    q = ref.clone()
    q[1, 3] = 2.0  # image 1 now says class 3
    q[4, 2] = 1.5  # image 4 now says class 2
    q[2, 2] = 0.9  # image 2 keeps class 2 with a changed logit: no flip
    agreement = LogitAgreement()
    agreement.add(q, ref)
    assert agreement.agreeing == 3
    assert agreement.top1_agreement == pytest.approx(60.0)
    assert agreement.max_abs_diff == pytest.approx(2.0)


def test_batches_accumulate_like_one_batch():
    ref = _random_logits(images=30, seed=3)
    q = ref + 0.3 * _random_logits(images=30, seed=4)
    whole = LogitAgreement()
    whole.add(q, ref)
    batched = LogitAgreement()
    for start, stop in ((0, 7), (7, 7), (7, 20), (20, 30)):  # uneven, one empty
        batched.add(q[start:stop], ref[start:stop])
    assert batched.images == whole.images == 30
    assert batched.agreeing == whole.agreeing
    assert 0 < whole.agreeing < 30  # the noise flips some argmaxes, not all
    assert batched.sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-12)
    assert batched.max_abs_diff == whole.max_abs_diff


def test_other_dtypes_are_compared_in_float64():
    ref = _random_logits(images=8, classes=100, seed=5)
    q = (ref + 0.05).half()
    agreement = LogitAgreement()
    agreement.add(q, ref)
    d = q.double() - ref.double()
    assert agreement.sqnr_db == pytest.approx(10 * math.log10(float(ref.double().square().sum() / d.square().sum())),
                                              rel=1e-12)


def test_nan_logits_show_in_every_measure():
    ref = _random_logits(images=4, classes=10, seed=8)
    broken = ref.clone()
    broken[1, (int(ref[1].argmax()) + 1) % 10] = math.nan  # not the class of image 1
    agreement = LogitAgreement()
    agreement.add(broken, ref)
    agreement.add(ref, ref)  # a later clean batch does not hide it
    assert math.isnan(agreement.sqnr_db)
    assert math.isnan(agreement.max_abs_diff)
    assert agreement.agreeing == 7  # torch's argmax picks the NaN: that image disagrees


@pytest.mark.parametrize("q_shape, ref_shape", [((4, 10), (4, 11)), ((4, 10), (5, 10)), ((40,), (40,)),
                                                ((2, 2, 10), (2, 2, 10))])
def test_shape_mismatch_raises_a_clear_value_error(q_shape, ref_shape):
    with pytest.raises(ValueError, match=r"must both be \[images, classes\] of the same shape"):
        LogitAgreement().add(torch.zeros(q_shape), torch.zeros(ref_shape))


def test_class_count_must_stay_the_same_across_batches():
    agreement = LogitAgreement()
    agreement.add(torch.zeros(2, 10), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="11 classes, earlier batches had 10"):
        agreement.add(torch.zeros(2, 11), torch.zeros(2, 11))


def test_no_images_is_an_error_not_a_number():
    agreement = LogitAgreement()
    agreement.add(torch.zeros(0, 10), torch.zeros(0, 10))
    assert agreement.images == 0
    for name in ("top1_agreement", "sqnr_db", "max_abs_diff"):
        with pytest.raises(ValueError, match="no images added"):
            getattr(agreement, name)
    assert "images=0" in repr(agreement)


def test_reference_logits_round_trip_as_cpu_float32_copies():
    store = ReferenceLogits()
    first, second = _random_logits(images=4, seed=6).double(), _random_logits(images=3, seed=7)
    store.record(0, first)
    store.record(1, second)
    second.zero_()  # a model reusing its output buffer must not change what was recorded
    assert len(store) == 2 and 0 in store and 2 not in store
    assert store[0].dtype == torch.float32 and store[0].device.type == "cpu"
    assert torch.equal(store[0], first.float())
    assert torch.equal(store[1], _random_logits(images=3, seed=7))
    assert store.images == 7
    assert store.nbytes == 7 * 1000 * 4


def test_reference_logits_refuse_duplicates_and_name_missing_batches():
    store = ReferenceLogits()
    store.record(0, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="batch 0 were already recorded"):
        store.record(0, torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"\[images, classes\]"):
        store.record(1, torch.zeros(10))
    with pytest.raises(KeyError, match=r"no reference logits for batch 5 \(recorded: batches 0..0\)"):
        store[5]


def test_reference_and_agreement_together():
    refs, agreement = ReferenceLogits(), LogitAgreement()
    batches = [_random_logits(images=5, seed=s) for s in range(3)]
    for i, logits in enumerate(batches):
        refs.record(i, logits)
    for i, logits in enumerate(batches):
        agreement.add(logits, refs[i])
    assert agreement.images == 15 and agreement.top1_agreement == 100.0 and agreement.sqnr_db == math.inf


def test_module_imports_only_torch_and_the_standard_library():
    source = Path(__file__).resolve().parents[1] / "pytorch_quantizer" / "agreement.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "agreement.py must not import from the package"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "torch", "numpy"}, imported
