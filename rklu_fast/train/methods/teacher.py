"""The unlearning teacher itself as a model: logits ``l_o − α·relu(l_aug − l_o)`` of the two frozen models, the
paper's "unlearning teacher" point (no training).  The stage saves a small manifest (``rklu_teacher.json``) that
``rklu_fast.teacher_model`` loads wherever a model is read (``rklu eval tofu``, the run summary)."""
from __future__ import annotations

from rklu_fast.train.methods.base import Method


class Teacher(Method):
    name = "teacher"
    summary = "the unlearning teacher l_o − α·relu(l_aug − l_o) itself, evaluated as a model (no training)"
    paper = "Wang et al., NAACL 2025 (the teacher the student distils from)"
    needs = frozenset({"augmented"})
    trains = False
    uses = ("alpha", "teacher_form")

    def build(self, original_ref, augmented_ref, load_model):
        from rklu_fast.teacher_model import TeacherModel

        return TeacherModel.from_references(original_ref, augmented_ref, self.ctx.alpha, load_model=load_model,
                                            form=self.ctx.teacher_form)
