"""Exports of one classifier checkpoint: their sizes, their largest difference from PyTorch on real photos,
and inference speed of onnxruntime and TorchScript beside PyTorch, timed in turns in one process.

    python benchmarks/export_check.py --checkpoint runs/pets/checkpoints/classifier-pretrained.safetensors \\
        --images ../shared/data/oxford-pets-sample/images --json

Needs the export extra (pip install -e '.[export]'). Both runtimes get the same thread count; each round
times PyTorch, TorchScript and onnxruntime once on the same batch, so load from other processes falls on
all three alike, and the median round counts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from aepretrain.checkpoints import load_classifier
from aepretrain.errors import UserError
from aepretrain.export import Deployable, export
from aepretrain.prediction import prepare_image


def photos(folder: Path, size: int, channels: int) -> torch.Tensor:
    pixels = []
    for path in sorted(folder.glob("*.jpg")):
        try:
            pixels.append(prepare_image(path, size, channels))
        except UserError:
            continue
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path, help="a folder of real photos (*.jpg)")
    parser.add_argument("--batches", default="1,32", help="batch sizes to time")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    classifier, meta = load_classifier(args.checkpoint)
    reference = Deployable(classifier).eval()
    images = photos(args.images, meta["image_size"], meta["in_channels"])
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "image_size": meta["image_size"],
                              "photos": len(images), "cpu": platform.processor() or platform.machine(),
                              "threads": args.threads, "torch": torch.__version__,
                              "onnxruntime": onnxruntime.__version__, "sizes": {}, "max_abs_diff": {}, "speed": []}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        runners = {"pytorch": lambda x: reference(x)}
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt"), ("backbone", "encoder.safetensors")):
            report["sizes"][fmt] = export(args.checkpoint, fmt, Path(folder) / name)["bytes"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        scripted = torch.jit.load(str(Path(folder) / "model.pt"))
        runners["torchscript"] = scripted
        runners["onnxruntime"] = lambda x: session.run(None, {"image": x.numpy()})
        expected = [o.numpy() for o in reference(images)]
        for name in ("onnxruntime", "torchscript"):
            got = runners[name](images)
            report["max_abs_diff"][name] = {output: float(np.abs(np.asarray(g) - e).max())
                                            for output, g, e in zip(("logits", "probabilities"), got, expected)}
        for batch in (int(b) for b in args.batches.split(",")):
            x = images[:batch].contiguous()
            seconds: dict[str, list[float]] = {name: [] for name in runners}
            for round_ in range(args.rounds + 2):  # two rounds of warm-up
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(x)
                    if round_ >= 2:
                        seconds[name].append(time.perf_counter() - start)
            speed = {name: batch / statistics.median(s) for name, s in seconds.items()}
            report["speed"].append({"batch": batch, "img_s": speed,
                                    "onnxruntime_over_pytorch": speed["onnxruntime"] / speed["pytorch"],
                                    "torchscript_over_pytorch": speed["torchscript"] / speed["pytorch"]})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.checkpoint}: {meta['image_size']} px, {len(images)} photos, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print("sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["sizes"].items()))
    for name, diff in report["max_abs_diff"].items():
        print(f"{name} vs PyTorch, largest absolute difference: logits {diff['logits']:.2e}, "
              f"probabilities {diff['probabilities']:.2e}")
    for row in report["speed"]:
        print(f"batch {row['batch']}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in row["img_s"].items())
              + f"; onnxruntime/pytorch {row['onnxruntime_over_pytorch']:.2f}, "
              f"torchscript/pytorch {row['torchscript_over_pytorch']:.2f}")


if __name__ == "__main__":
    main()
