"""The lab report's numbers (../shared/SPEC.md), defined once: the report sets ours beside them and the tests
hold the models to the parameter counts, which are exact targets.

The lab report is the reference this project reproduces: greedy layer-wise convolutional-autoencoder
pre-training on Oxford-IIIT Pet. Its numbers are comparable with a run's only when the run did the same task
(:func:`same_task`); otherwise the report shows them apart, for orientation.

Example:
    >>> REFERENCE["classifier_total"] == sum(REFERENCE["classifier_layers"])
    True
    >>> from aepretrain.config import resolve
    >>> pets = {"name": "oxford-pets", "classes": [f"breed{k}" for k in range(37)], "image_size": 224, "channels": 3}
    >>> same_task(resolve("seed").model, pets), same_task(resolve("pets-sample").model, pets)
    (True, False)
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, resolve

REFERENCE = {
    "classifier_total": 1_128_997,
    "classifier_layers": [9472, 256, 0, 0, 73856, 512, 0, 147584, 512, 0, 0, 295168, 1024, 0, 590080, 1024, 0, 0,
                          0, 0, 9509],
    "stages": [
        {"params": (212_483, 212_227, 256), "seconds": 660, "train_loss": 0.0023},
        {"params": (931_843, 920_963, 10_880), "seconds": 1020, "train_loss": 0.0035},
        {"params": (3_148_803, 2_913_923, 234_880), "seconds": 1110, "train_loss": 0.0057},
    ],
    "test_mse": 0.0055,
    "scratch": {"test_loss": 1.0759, "test_accuracy": 0.6678, "epochs": 66},
    "pretrained": {"test_loss": 1.2430, "test_accuracy": 0.6545, "epochs": 34},
    "prediction": [("Bombay", 0.99999905), ("scottish_terrier", 9.24e-07), ("Siamese", 1.51e-09)],
}

# The lab's task: the data set as a run records it (metrics.json "dataset"), and the network of the `seed` preset.
TASK = {"name": "oxford-pets", "classes": 37, "image_size": 224, "channels": 3}
SETUP = ("greedy layer-wise pre-training of convolutional autoencoders on Oxford-IIIT Pet (37 cat and dog breeds, "
         "224x224 RGB), 30 autoencoder epochs per stage on a third of train + validation, then fine-tuning of the whole "
         "classifier with augmentation, one run per arm; the network is the `seed` preset's: three blocks (one 7x7 "
         "convolution of 64 channels, stride 2; two 3x3 of 128; two 3x3 of 256; each with BatchNorm and ReLU, then "
         "max-pooling), global average pooling, dropout and a dense layer, 1,128,997 parameters")


def same_task(model: ModelConfig, dataset: dict[str, Any]) -> bool:
    """Whether a run with this network (config's ``model``) and data set (metrics.json's record) did the lab
    report's task, so that its numbers compare with the run's."""
    seed = resolve("seed").model
    network = ("blocks", "classifier_stride", "autoencoder_stride")
    return (dataset.get("name") == TASK["name"] and len(dataset.get("classes", [])) == TASK["classes"]
            and dataset.get("image_size") == TASK["image_size"] and dataset.get("channels") == TASK["channels"]
            and all(getattr(model, key) == getattr(seed, key) for key in network))
