"""``LoRALinear``: a drop-in ``nn.Linear`` with named LoRA adapters and a fused forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import lora_linear
from .ops import autocast_copy

DEFAULT_ADAPTER = "default"


def _check_hyperparameters(rank, alpha, dropout, names: tuple[str, str, str] = ("rank", "alpha", "dropout")) -> None:
    """Refuse a bad rank, alpha or dropout; ``names`` are the fields as the caller's source
    spells them (PEFT's ``r``, ``lora_alpha``, ``lora_dropout`` for a config)."""
    rank_name, alpha_name, dropout_name = names
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{rank_name} must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{alpha_name} must be a finite number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{dropout_name} must be in [0, 1), got {dropout!r}")


def adapter_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRAAdapter(nn.Module):
    """One adapter's trainable pair ``lora_A [rank, in]``, ``lora_B [out, rank]`` and its settings."""

    def __init__(self, in_features, out_features, rank, alpha, dropout, use_rslora, device=None, dtype=None):
        super().__init__()
        _check_hyperparameters(rank, alpha, dropout)
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, float(alpha), float(dropout), bool(use_rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's init: A Kaiming-uniform, B zero, so a fresh adapter leaves the layer unchanged.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def scaling(self) -> float:
        return adapter_scaling(self.rank, self.alpha, self.use_rslora)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B · A`` in fp32: what merging adds to the base weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}"


class LoRALinear(nn.Module):
    """``y = x·Wᵀ + b + (alpha/rank)·B·A·dropout(x)`` with ``W``/``b`` frozen.

    ``weight`` and ``bias`` keep ``nn.Linear``'s names (pretrained checkpoints load as
    they are); ``lora_A``/``lora_B`` are the active adapter's parameters. Several named
    adapters can live on one layer; :meth:`set_adapter` switches between them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        alpha: float = 1.0,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from_base(base.weight, base.bias, backend)
        self.add_adapter(DEFAULT_ADAPTER, rank, alpha, dropout, use_rslora)

    def _init_from_base(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> None:
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.backend = backend
        self.adapters = nn.ModuleDict()
        self.active_adapter = DEFAULT_ADAPTER
        self.merged_adapter: str | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int = 4,
        alpha: float = 1.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ) -> "LoRALinear":
        """Wrap ``linear``, reusing (not copying) its weight and bias, which are frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_from_base(linear.weight, linear.bias, backend)
        layer.add_adapter(DEFAULT_ADAPTER, rank, alpha, dropout, use_rslora)
        layer.train(linear.training)  # an injected eval-mode model must not start applying dropout
        return layer

    # -- adapters -------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0,
                    use_rslora: bool = False, activate: bool = False) -> LoRAAdapter:
        """Add (or replace) adapter ``name``; LoRA parameters are fp32 over a half-precision base."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"unmerge adapter {self.merged_adapter!r} before adding adapters")
        dtype = self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32
        adapter = LoRAAdapter(self.in_features, self.out_features, rank, alpha, dropout, use_rslora,
                              device=self.weight.device, dtype=dtype)
        self.adapters[name] = adapter
        if activate or name == self.active_adapter or len(self.adapters) == 1:
            self.set_adapter(name)
        else:
            adapter.requires_grad_(False)
        return adapter

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: the one used in forward and the only one trainable."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {list(self.adapters)}")
        if self.merged_adapter is not None and self.merged_adapter != name:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged; unmerge it before switching to {name!r}")
        for adapter_name, adapter in self.adapters.items():
            adapter.requires_grad_(adapter_name == name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, the first remaining adapter becomes active."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {list(self.adapters)}")
        if name == self.merged_adapter:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it first")
        if len(self.adapters) == 1:
            raise ValueError(f"cannot delete {name!r}, the layer's only adapter: a LoRALinear always has an "
                             "active adapter (add another one first)")
        del self.adapters[name]
        if self.active_adapter == name:
            self.set_adapter(next(iter(self.adapters)))

    @property
    def adapter(self) -> LoRAAdapter:
        return self.adapters[self.active_adapter]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.adapter.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.adapter.lora_B

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def alpha(self) -> float:
        return self.adapter.alpha

    @property
    def dropout(self) -> float:
        return self.adapter.dropout

    @property
    def use_rslora(self) -> bool:
        return self.adapter.use_rslora

    @property
    def scaling(self) -> float:
        return self.adapter.scaling

    # -- merge ----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into ``weight``: inference then runs the plain linear."""
        if self.merged_adapter is not None:
            return
        merged = self.weight.float() + self.adapter.delta_weight().to(self.weight.device)
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged_adapter = self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact in fp32; within rounding for half-precision weights)."""
        if self.merged_adapter is None:
            return
        delta = self.adapters[self.merged_adapter].delta_weight().to(self.weight.device)
        self.weight.copy_((self.weight.float() - delta).to(self.weight.dtype))
        self.merged_adapter = None

    def _set_merged_flag(self, name: str | None) -> None:
        """Record that ``weight`` holds (``name``) or lacks (``None``) an adapter's delta without
        touching it: for layers whose weight another LoRA layer has already merged into (shared)."""
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; this layer has {list(self.adapters)}")
        self.merged_adapter = name

    # -- state dict: the merged state travels with the weights -------------------------
    # A merged layer's ``weight`` already holds scaling·B·A; loading it into an unmerged layer
    # would apply LoRA twice. So a merged layer's state dict carries MERGED_KEY (the adapter's
    # name as UTF-8 bytes) and loading sets the merged state from it (absent = unmerged, which
    # keeps state dicts of unmerged layers exactly nn.Linear's keys plus the adapters').
    MERGED_KEY = "lora_merged_adapter"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged_adapter is not None:
            destination[prefix + self.MERGED_KEY] = torch.tensor(list(self.merged_adapter.encode()), dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Checked before anything loads (raising, not error_msgs: torch would still load the
        # adapters below and leave weight and merged flag disagreeing).
        marker = state_dict.pop(prefix + self.MERGED_KEY, None)
        name = bytes(marker.tolist()).decode() if marker is not None else None
        has_weight = prefix + "weight" in state_dict
        if name is not None and not has_weight:
            raise RuntimeError(f"{prefix}{self.MERGED_KEY} says the weight is merged, but {prefix}weight is missing "
                               "from the state dict")
        if name is not None and name not in self.adapters:
            raise RuntimeError(f"{prefix}weight was saved with adapter {name!r} merged into it, but this layer has "
                               f"no adapter {name!r} (it has {list(self.adapters)})")
        merged_prefix = f"{prefix}adapters.{self.merged_adapter}."
        if not has_weight and self.merged_adapter is not None and any(k.startswith(merged_prefix) for k in state_dict):
            raise RuntimeError(f"{prefix}: adapter {self.merged_adapter!r} is merged into the weight, so its A/B "
                               "cannot be loaded without the weight; unmerge first")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if has_weight:
            self.merged_adapter = name
            if name is not None:
                self.set_adapter(name)

    # -- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_adapter is not None:
            return F.linear(x, self.weight, self.bias)
        adapter = self.adapter
        lora_A, lora_B = adapter.lora_A, adapter.lora_B
        if lora_A.dtype != self.weight.dtype:
            # fp32 adapters over a half-precision base run in the base's dtype (autograd casts grads back);
            # as under autocast, the op then saves the fp32 parameters, not these copies (autocast_copy).
            lora_A, lora_B = (autocast_copy(t, self.weight.dtype) for t in (lora_A, lora_B))
        return lora_linear(x, self.weight, self.bias, lora_A, lora_B, adapter.scaling,
                           adapter.dropout, self.training, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"active_adapter={self.active_adapter!r}, backend={self.backend!r}"
                + (f", merged={self.merged_adapter!r}" if self.merged_adapter else ""))
