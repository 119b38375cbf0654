"""Editing saved adapter files the way a user (or another tool) would, for the load tests."""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_adapter(directory: Path, config_text: str | None = None, drop_keys=(), **config_changes) -> None:
    """Rewrite ``directory``'s adapter: the config replaced by ``config_text`` or updated with
    ``config_changes``, the weights without ``drop_keys``. The weights are written without
    our config digest, as a hand edit or another tool would leave them."""
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if config_text is None:
        config = json.loads(config_path.read_text())
        config.update(config_changes)
        config_text = json.dumps(config)
    config_path.write_text(config_text)
    tensors = load_file(weights_path)
    save_file({key: value for key, value in tensors.items() if key not in drop_keys}, weights_path)
