"""Data: TOFU loading, the prompt templates shared by training and evaluation, plain-text chunks."""
from rklu_fast.data.templates import TEMPLATES, Template, encode_qa, get_template
from rklu_fast.data.tofu import TOFU_SPLITS, default_data_dir, load_tofu

__all__ = ["TEMPLATES", "Template", "encode_qa", "get_template", "TOFU_SPLITS", "default_data_dir", "load_tofu"]
