"""Loss plug-ins: normalisation by num_items, the teacher's entropy, the vocab check, bad names."""
import pytest
import torch

from rklu_fast.train.frozen import TeacherRows
from rklu_fast.train.methods import make_method, make_retain_term
from rklu_fast.train.methods.rklu import teacher_entropy_sum
from rklu_fast.train.teacher import check_same_vocab


def test_teacher_entropy_matches_hand_computation():
    torch.manual_seed(1)
    lo, la = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, -100, 4, 5]])  # targets → logits rows
    rows = [(0, 0), (0, 1), (1, 2), (1, 3)]
    lt = (lo - 3.0 * torch.relu(la - lo)).double()
    q = lt.softmax(-1)
    ent = -(q * q.log()).sum(-1)
    hand = float((ent[0, 0] + ent[0, 1]) / 2 + (ent[1, 2] + ent[1, 3]) / 2)  # per-sequence means, summed
    got = teacher_entropy_sum(TeacherRows(lo, la, "all"), labels, 3.0)
    assert float(got) == pytest.approx(hand, rel=1e-5)
    compact = TeacherRows(torch.stack([lo[b, t] for b, t in rows]), torch.stack([la[b, t] for b, t in rows]), "valid")
    assert float(teacher_entropy_sum(compact, labels, 3.0)) == pytest.approx(hand, rel=1e-5)


def test_names_and_vocab_check():
    assert make_method("rklu").name == "rklu" and make_method("fklu").name == "fklu"
    assert make_retain_term("none") is None and make_retain_term("KL").name == "KL"
    with pytest.raises(ValueError, match="unlearn.method: unknown method 'gd'; choose one of"):
        make_method("gd")
    with pytest.raises(ValueError, match="retain_term"):
        make_retain_term("rt2")

    class M:
        def __init__(self, v):
            self.config = type("C", (), {"vocab_size": v})()

    check_same_vocab(student=M(5), original=M(5), augmented=None)
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_same_vocab(student=M(5), original=M(5), augmented=M(6))
