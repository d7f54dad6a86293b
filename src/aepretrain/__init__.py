"""aepretrain: greedy layer-wise convolutional autoencoder pre-training for CNN image classifiers.

The Python API, the same the CLI calls:

    >>> import aepretrain
    >>> cfg = aepretrain.resolve("quick", overrides=["finetune.epochs=2"])  # doctest: +SKIP
    >>> metrics = aepretrain.run(cfg, "runs/demo")  # doctest: +SKIP
    >>> aepretrain.predict(["cat.jpg"], "runs/demo/checkpoints/classifier-pretrained.safetensors")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import Config, resolve  # noqa: E402
from .data import prepare  # noqa: E402
from .errors import UserError  # noqa: E402
from .pipeline import run, run_evaluate, run_finetune, run_pretrain  # noqa: E402
from .predict import predict  # noqa: E402
from .report import write_report  # noqa: E402

__all__ = ["Config", "UserError", "predict", "prepare", "resolve", "run", "run_evaluate", "run_finetune",
           "run_pretrain", "write_report", "__version__"]
