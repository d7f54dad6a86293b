"""aepretrain: greedy layer-wise convolutional autoencoder pre-training for CNN image classifiers.

The Python API, the same the CLI calls:

    >>> import aepretrain, tempfile
    >>> out = tempfile.mkdtemp()
    >>> cfg = aepretrain.resolve("tiny", overrides=["trainer.smoke=true"])  # "quick" for the real demo
    >>> metrics = aepretrain.run(cfg, out)
    >>> sorted(metrics["finetune"])
    ['pretrained', 'scratch']
    >>> from PIL import Image
    >>> Image.new("RGB", (40, 30), "red").save(f"{out}/red.png")
    >>> rows = aepretrain.predict([f"{out}/red.png"], f"{out}/checkpoints/classifier-pretrained.safetensors", 2)
    >>> len(rows[0]["top"])
    2
"""

from importlib import import_module
from typing import Any

from .errors import require_posix

__version__ = "0.1.0"

# Imported on first use, so that `aepretrain --help` does not wait for torch and Lightning.
_API = {
    "Config": "config", "resolve": "config", "UserError": "errors", "prepare": "data", "run": "pipeline",
    "run_pretrain": "pipeline", "run_finetune": "pipeline", "run_evaluate": "pipeline", "predict": "prediction",
    "write_report": "report", "study": "label_study", "bench": "benchmark", "load_encoder": "export",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'aepretrain' has no attribute '{name}'")
    if name != "UserError":
        require_posix()  # Windows: one clear line, not fcntl's ImportError from deep inside
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value
