"""Keras 3 (TensorFlow backend) reference timings for the aepretrain networks.

Builds the two reference networks of the Keras lab report, channels-last with
padding="same" everywhere:

* ``classifier``: the 37-class CNN (1,128,997 params at any input size);
* ``stage3``: the third greedy convolutional autoencoder, whose first two encoder
  blocks are frozen (3,148,803 total / 2,913,923 trainable / 234,880 non-trainable).

For each model and precision it measures one optimizer step (Adam 1e-3) on
synthetic tensors: after ``--warmup`` steps, each of ``--steps`` calls to
``model.train_on_batch`` is timed individually, and the reported throughput is
``batch / median step time`` in images per second. ``bf16`` uses the
``mixed_bfloat16`` global policy with the output layer kept in float32.

Run it from a separate environment holding TensorFlow and Keras 3:

    python3 -m venv /tmp/venv-keras && /tmp/venv-keras/bin/pip install tensorflow-cpu keras
    /tmp/venv-keras/bin/python benchmarks/keras_reference.py --size 224 --batch 32 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

NUM_CLASSES = 37
PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}
CLASSIFIER_PARAMS = 1_128_997
STAGE3_PARAMS = (3_148_803, 2_913_923, 234_880)  # total, trainable, non-trainable
FROZEN_STAGE3_LAYERS = ("conv1", "bn1", "conv2a", "bn2a", "conv2b", "bn2b")


def conv_bn_relu(x: keras.KerasTensor, filters: int, kernel: int, name: str,
                 strides: int = 1) -> keras.KerasTensor:
    """Conv2D -> BatchNormalization -> ReLU; layers are named conv<name>/bn<name>."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", name=f"conv{name}")(x)
    x = layers.BatchNormalization(name=f"bn{name}")(x)
    return layers.ReLU()(x)


def encoder(x: keras.KerasTensor, first_stride: int) -> keras.KerasTensor:
    """Shared encoder: 64@7x7 -> pool -> 2x128@3x3 -> pool -> 2x256@3x3 -> pool."""
    x = conv_bn_relu(x, 64, 7, "1", strides=first_stride)
    x = layers.MaxPooling2D(2)(x)
    x = conv_bn_relu(x, 128, 3, "2a")
    x = conv_bn_relu(x, 128, 3, "2b")
    x = layers.MaxPooling2D(2)(x)
    x = conv_bn_relu(x, 256, 3, "3a")
    x = conv_bn_relu(x, 256, 3, "3b")
    return layers.MaxPooling2D(2)(x)


def build_classifier(size: int, jit: bool) -> keras.Model:
    """The 37-class classifier; the softmax head stays float32 under mixed precision."""
    inputs = keras.Input((size, size, 3))
    x = encoder(inputs, first_stride=2)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="head")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", jit_compile=jit)
    return model


def build_stage3(size: int, jit: bool) -> keras.Model:
    """Autoencoder #3: stride-1 encoder with blocks 1-2 frozen, mirrored decoder, MSE."""
    inputs = keras.Input((size, size, 3))
    x = encoder(inputs, first_stride=1)
    x = conv_bn_relu(x, 256, 3, "d3a")
    x = conv_bn_relu(x, 256, 3, "d3b")
    x = layers.UpSampling2D(2)(x)
    x = conv_bn_relu(x, 128, 3, "d2a")
    x = conv_bn_relu(x, 128, 3, "d2b")
    x = layers.UpSampling2D(2)(x)
    x = conv_bn_relu(x, 64, 7, "d1")
    x = layers.UpSampling2D(2)(x)
    outputs = layers.Conv2D(3, 3, padding="same", dtype="float32", name="recon")(x)
    model = keras.Model(inputs, outputs, name="stage3")
    for name in FROZEN_STAGE3_LAYERS:
        model.get_layer(name).trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=jit)
    return model


def n_params(weights: list[keras.Variable]) -> int:
    """Total number of scalars in a list of variables."""
    return sum(math.prod(w.shape) for w in weights)


def check_params(model: keras.Model) -> None:
    """Assert the reference parameter counts (they do not depend on the input size)."""
    if model.name == "classifier":
        assert model.count_params() == CLASSIFIER_PARAMS, model.count_params()
    else:
        counts = (model.count_params(), n_params(model.trainable_weights),
                  n_params(model.non_trainable_weights))
        assert counts == STAGE3_PARAMS, counts


def time_model(name: str, size: int, batch: int, precision: str,
               warmup: int, steps: int, jit: bool) -> float:
    """Median images/s of ``model.train_on_batch`` on synthetic data."""
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])
    try:
        build = build_classifier if name == "classifier" else build_stage3
        model = build(size, jit)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    check_params(model)
    x = tf.random.uniform((batch, size, size, 3), 0.0, 1.0)
    y = (tf.random.uniform((batch,), 0, NUM_CLASSES, dtype=tf.int32)
         if name == "classifier" else x)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns the loss as a NumPy value, so it syncs
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="classifier,stage3")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--json", action="store_true", help="print only a JSON document")
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.precisions = args.precisions.split(",")
    for model in args.models:
        if model not in ("classifier", "stage3"):
            parser.error(f"unknown model {model!r}")
    for precision in args.precisions:
        if precision not in PRECISION_POLICIES:
            parser.error(f"unknown precision {precision!r}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    rows = [
        {"model": model, "size": args.size, "batch": args.batch, "precision": precision,
         "step_img_s": round(time_model(model, args.size, args.batch, precision,
                                        args.warmup, args.steps, args.jit), 2)}
        for model in args.models
        for precision in args.precisions
    ]
    framework = f"keras {keras.__version__} / tensorflow {tf.__version__}"
    if args.json:
        print(json.dumps({"framework": framework, "rows": rows}))
        return
    print(f"{framework}, jit={'on' if args.jit else 'off'}")
    print(f"{'model':<12}{'size':>6}{'batch':>7}{'precision':>11}{'step img/s':>12}")
    for row in rows:
        print(f"{row['model']:<12}{row['size']:>6}{row['batch']:>7}"
              f"{row['precision']:>11}{row['step_img_s']:>12.2f}")


if __name__ == "__main__":
    main()
