"""Triton kernels of lora_fused, installed as ``lora_fused.kernels``."""
