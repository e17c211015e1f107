"""Loss plug-ins: normalisation by num_items, the teacher's entropy, the vocab check, bad names."""
import pytest
import torch

from rklu_fast.train.methods import make_method, make_retain_term, nll_loss, teacher_entropy
from rklu_fast.train.teacher import check_same_vocab


def test_nll_is_token_sum_over_num_items():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    logp = logits.double().log_softmax(-1)
    hand = -sum(logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] != -100)
    torch.testing.assert_close(nll_loss(logits, labels, 13).double(), hand / 13, rtol=1e-6, atol=1e-7)


def test_teacher_entropy_matches_hand_computation():
    torch.manual_seed(1)
    lo, la = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100]])  # targets at positions 1, 2 → logits rows 0, 1
    lt = (lo - 3.0 * torch.relu(la - lo))[0, :2].double()
    q = lt.softmax(-1)
    hand = float(-(q * q.log()).sum(-1).mean())
    assert teacher_entropy(lo, la, labels[:, 1:], 3.0) == pytest.approx(hand, rel=1e-5)


def test_names_and_vocab_check():
    assert make_method("rklu").name == "rklu" and make_method("fklu").name == "fklu"
    assert make_retain_term("none") is None and make_retain_term("KL").name == "KL"
    with pytest.raises(ValueError, match="method"):
        make_method("ga")
    with pytest.raises(ValueError, match="retain_term"):
        make_retain_term("rt2")

    class M:
        def __init__(self, v):
            self.config = type("C", (), {"vocab_size": v})()

    check_same_vocab(student=M(5), original=M(5), augmented=None)
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_same_vocab(student=M(5), original=M(5), augmented=M(6))
