"""SAM polyp-segmentation LoRA example: data, synthetic data, model, training and evaluation."""
