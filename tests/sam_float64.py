"""A float64 copy of a segment_anything SAM: the exact function its float32 runs approximate.

SAM's random positional encoding builds its grid in float32 whatever the model's dtype
(prompt_encoder.py), so a plain ``.double()`` copy fails on a float32 @ float64 matmul. In
the copy that layer stays float32 (its inputs are small exact numbers: grid indices, pixel
coordinates) and hands float64 on; the float32 runs under comparison share it anyway.
"""

from __future__ import annotations

import torch.nn as nn

from parity import in_float64


class Float32Positions(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.float()

    def forward(self, size):
        return self.layer(size).double()

    def forward_with_coords(self, coords, image_size):
        return self.layer.forward_with_coords(coords.float(), image_size).double()


def sam_in_float64(sam: nn.Module) -> nn.Module:
    """``in_float64(sam)`` with the positional encoding kept float32 (see the module doc)."""
    sam64 = in_float64(sam)
    sam64.prompt_encoder.pe_layer = Float32Positions(sam64.prompt_encoder.pe_layer)
    return sam64
