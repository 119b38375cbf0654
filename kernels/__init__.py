"""Triton kernels of lora_fused, installed as ``lora_fused.kernels``."""

from . import interpreter_compat

interpreter_compat.apply()
