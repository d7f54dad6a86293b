"""aepretrain: greedy layer-wise convolutional autoencoder pre-training for CNN image classifiers.

The Python API, the same the CLI calls:

    >>> import aepretrain
    >>> cfg = aepretrain.resolve("quick", overrides=["finetune.epochs=2"])  # doctest: +SKIP
    >>> metrics = aepretrain.run(cfg, "runs/demo")  # doctest: +SKIP
    >>> aepretrain.predict(["cat.jpg"], "runs/demo/checkpoints/classifier-pretrained.safetensors")  # doctest: +SKIP
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `aepretrain --help` does not wait for torch and Lightning.
_API = {
    "Config": "config", "resolve": "config", "UserError": "errors", "prepare": "data", "run": "pipeline",
    "run_pretrain": "pipeline", "run_finetune": "pipeline", "run_evaluate": "pipeline", "predict": "predict",
    "write_report": "report", "study": "study", "bench": "bench", "load_encoder": "export",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'aepretrain' has no attribute '{name}'")
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # importing the submodule bound its name here (aepretrain.predict): the function wins
    return value
