"""Print our throughput beside the Keras reference's, from the two --json outputs.

    python benchmarks/compare.py ours.json keras.json
"""

from __future__ import annotations

import json
import sys

KERAS_PRECISION = {"32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}


def main(ours_path: str, keras_path: str) -> None:
    ours, keras = json.load(open(ours_path)), json.load(open(keras_path))
    theirs = {(r["model"], r["size"], r["batch"], r["precision"]): r["step_img_s"] for r in keras["rows"]}
    print(f"ours: {ours['device']}, torch {ours.get('torch')}; reference: {keras['framework']}")
    print(f"{'model':>10} {'size':>5} {'batch':>5} {'precision':>11} {'ours img/s':>11} {'keras img/s':>12} "
          f"{'ratio':>6} {'vs keras bf16':>14}")
    for r in ours["rows"]:
        key = (r["model"], r["size"], r["batch"])
        same = theirs.get((*key, KERAS_PRECISION.get(r["precision"], r["precision"])))
        bf16 = theirs.get((*key, "bf16"))
        ratio = f"{r['step_img_s'] / same:.2f}" if same else "n/a"
        vs_bf16 = f"{r['step_img_s'] / bf16:.2f}" if bf16 else "n/a"
        print(f"{r['model']:>10} {r['size']:>5} {r['batch']:>5} {r['precision']:>11} {r['step_img_s']:>11.2f} "
              f"{same if same else 'n/a':>12} {ratio:>6} {vs_bf16:>14}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
