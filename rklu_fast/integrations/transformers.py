"""RKLU (and every method of the toolkit's registry) inside a Hugging Face ``Trainer`` script::

    from rklu_fast.integrations.transformers import ForgetRetainDataset, UnlearningTrainer

    data = ForgetRetainDataset.from_tofu(tokenizer, "phi", forget="forget10", retain="retain90")
    trainer = UnlearningTrainer(model=student, args=training_args, train_dataset=data, processing_class=tokenizer,
                                original=original, augmented=augmented)          # RKLU + RT by default
    trainer.train()

Same optimizer steps as ``rklu run`` for the same seed and batch size (sampling order, normalisation, parameter
groups and schedule are the toolkit's); docs/trainer.md says what differs from open-unlearning's trainers.
"""
from rklu_fast.integrations.hf_data import (ForgetRetainCollator, ForgetRetainDataset, MicroBatch, StepMicroBatches,
                                            StepSampler, step_loader)
from rklu_fast.integrations.hf_frozen import build_frozen, cached_teacher
from rklu_fast.integrations.hf_trainer import UnlearningMixin, UnlearningTrainer

__all__ = ["ForgetRetainCollator", "ForgetRetainDataset", "MicroBatch", "StepMicroBatches", "StepSampler",
           "UnlearningMixin", "UnlearningTrainer", "build_frozen", "cached_teacher", "step_loader"]
