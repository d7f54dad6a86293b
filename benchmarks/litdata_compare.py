"""The two candidates for the data store, on the same folder of photos: our raw memory-mapped ``.npy`` and
Lightning's litdata (``optimize`` into chunks, read with ``StreamingDataset``).

Each phase runs as a child process whose peak memory is measured as benchmarks/memory.py does (peak PSS of the
process tree and its anonymous part, largest single RSS):

- build: decode every photo (open, JPEG draft, RGB, resize to 224) into the format, on every core;
- read: two shuffled epochs of batches of 32 uint8 images, as they reach the training step (nothing else is
  done with them), from a warm page cache; images per second of the second epoch.

litdata pulls in torchvision and boto3 and wants a torch of its own, so it lives in a virtual environment
apart (pinned to our torch):

    python3 -m venv /tmp/venv-lit && echo torch==2.13.0 > /tmp/c.txt
    /tmp/venv-lit/bin/pip install -c /tmp/c.txt torch==2.13.0 litdata==0.2.76
    .venv/bin/python benchmarks/litdata_compare.py --n 2000 --litdata-python /tmp/venv-lit/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measured, photo_folder  # noqa: E402

SIZE, BATCH = 224, 32


def decode_photo(path: str) -> dict:
    """What both candidates store per photo: the pixels as our decoder makes them, and a label."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (SIZE, SIZE))
        pixels = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.uint8)
    return {"image": pixels, "label": 0}


def epochs(batches, seconds: list[float]) -> None:
    """Two passes; the images per second of each is appended to ``seconds``."""
    for _ in range(2):
        started, seen = time.perf_counter(), 0
        for x in batches():
            seen += len(x)
        seconds.append(seen / (time.perf_counter() - started))


def phase(name: str, folder: Path, out: Path, workers: int) -> None:
    """One measured phase, run in this (child) process; prints a JSON line."""
    files = sorted(folder.iterdir())
    rates: list[float] = []
    if name == "build-ours":
        from aepretrain.data.cache import decode_cached

        decode_cached("folder", "all", files, [0] * len(files), [f.name for f in files], SIZE, 10**9, str(out))
    elif name == "read-ours":
        from aepretrain.data.cache import decode_cached
        from aepretrain.data.loading import loader

        data, _ = decode_cached("folder", "all", files, [0] * len(files), [f.name for f in files], SIZE, 10**9, str(out))
        feed = loader(data, BATCH, True, seed=0, drop_last=True)
        epochs(lambda: (x for x, _ in feed), rates)
    elif name == "build-litdata":
        from litdata import optimize

        optimize(fn=decode_photo, inputs=[str(f) for f in files], output_dir=str(out), chunk_bytes="64MB",
                 num_workers=workers, verbose=False)
    elif name == "read-litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        dataset = StreamingDataset(str(out), shuffle=True, seed=0, drop_last=True)
        feed = StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers, drop_last=True)
        epochs(lambda: (b["image"] for b in feed), rates)
    print(json.dumps({"phase": name, "img_s": [round(r) for r in rates]}), file=sys.stderr)  # stdout is not kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/aepretrain-litdata")
    parser.add_argument("--litdata-python", default="/tmp/venv-lit/bin/python")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    work = Path(args.work)
    if args.phase:
        phase(args.phase, work / "photos", work / args.phase.split("-")[1], args.workers)
        return
    shutil.rmtree(work, ignore_errors=True)
    photo_folder(work / "photos", args.n)
    src = str(Path(__file__).resolve().parents[1] / "src")
    rows = []
    try:
        for name, python, workers in (("build-ours", sys.executable, args.workers),
                                      ("build-litdata", args.litdata_python, args.workers),
                                      ("read-ours", sys.executable, 0),
                                      ("read-litdata", args.litdata_python, 0),
                                      ("read-litdata", args.litdata_python, args.workers)):
            env = dict(os.environ, PYTHONPATH=src)
            result = measured([python, __file__, "--work", str(work), "--phase", name, "--workers", str(workers)], env)
            printed = re.findall(r"^\{.*\}$", str(result["stderr"]), re.M)
            row = {"phase": name, "loader_workers" if name.startswith("read") else "decoders": workers,
                   "seconds": result["seconds"], "peak_pss_mb": result["peak_pss_mb"],
                   "peak_anon_mb": result["peak_anon_mb"],
                   "max_rss_mb": result["max_rss_mb"], "rc": result["rc"],
                   "img_s_per_epoch": json.loads(printed[-1])["img_s"] if printed else None}
            if result["rc"] != 0:
                row["error"] = str(result["stderr"])[-1500:]
            rows.append(row)
            print(json.dumps(row), flush=True)
        sizes = {k: sum(f.stat().st_size for f in (work / k).rglob("*") if f.is_file()) for k in ("ours", "litdata")}
        print(json.dumps({"on_disk_bytes": sizes}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
