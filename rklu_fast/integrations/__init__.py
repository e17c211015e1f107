"""Integrations of the toolkit into other training programs (``transformers``: a Hugging Face ``Trainer``)."""
