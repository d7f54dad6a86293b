"""Peak memory and decode speed of the data store as the number of images grows.

For each N it makes a folder of N real photos (hard links to the shared Oxford-IIIT Pet sample's photos under
new names: each is decoded as a file of its own), then, each in a fresh cache, runs as child processes

- ``aepretrain data --dataset folder --root FOLDER --image-size 224`` (decodes every photo into the store), and
- ``aepretrain run --preset seed --smoke --dataset synthetic --pretrain-data FOLDER`` (maps that store and
  pre-trains on it: all N images by default, a few batches per stage; the labelled data are the small
  synthetic set, so that none of the photos is left out as a labelled test image; probes off, as they cost
  minutes on a CPU and hold nothing of the store),

and records the peak memory of each child's process tree: the largest proportional set size (PSS: shared pages
counted once, split among the processes sharing them) sampled every 0.1 s from /proc, the peak of its
anonymous part (what the processes hold themselves; the rest is the page cache's file pages, the mapped store
among them, which the kernel drops under pressure), and the largest single-process resident set
(``ru_maxrss``). Decode speed is the store's own summary line (decode, write with a digest per image, flush to
disk, rename) against a bare Pillow loop (open, draft, RGB, resize; nothing kept) over the same files with the
same number of processes. This host's speed drifts by 10-20 % from one minute to the next, so each N alternates
bare loop, build, bare loop, build, bare loop (``--rounds 2``, each build into an empty cache), and the ratio is
of the means.

    python benchmarks/memory.py --sizes 2000,8000,32000 --work /tmp/aepretrain-memory

The 32,000 case writes a 4.8 GB store under --work, deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PETS = Path(os.environ.get("AEPRETRAIN_SHARED", REPO.parent / "shared")) / "data" / "oxford-pets-sample"


def photo_folder(folder: Path, count: int) -> list[Path]:
    """``count`` hard links (copies where links fail) to the sample's photos, cycling, under new names."""
    photos = sorted((PETS / "images").glob("*.jpg"))  # the photos, not the three .mat files beside them
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        target = folder / f"photo{i:06d}.jpg"
        if not target.exists():
            try:
                os.link(photos[i % len(photos)], target)
            except OSError:
                shutil.copyfile(photos[i % len(photos)], target)
        made.append(target)
    return made


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _pss_kb(pid: int) -> tuple[int, int]:
    """(PSS, its anonymous part) of one process in kB: the rest is file pages, the page cache's (the mapped store)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    found = dict(re.findall(r"^(Pss|Pss_Anon):\s+(\d+) kB", text, re.M))
    return int(found.get("Pss", 0)), int(found.get("Pss_Anon", 0))


def measured(command: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run ``command``; its exit code, seconds, stderr, and in MB the peak PSS of its process tree, the peak of
    that PSS's anonymous part (memory the processes hold themselves, not the page cache's file pages they map),
    and the largest single-process peak RSS among its descendants."""
    started = time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the child
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    peak, peak_anon = 0, 0
    while True:  # wait4, not poll: it gives this child's own resource usage, its largest RSS included
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        sizes = [_pss_kb(p) for p in _tree(child.pid)]
        peak, peak_anon = max(peak, sum(s for s, _ in sizes)), max(peak_anon, sum(a for _, a in sizes))
        time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    return {"rc": child.returncode, "seconds": round(time.perf_counter() - started, 1), "stderr": log.read(),
            "peak_pss_mb": round(peak / 1024), "peak_anon_mb": round(peak_anon / 1024),
            "max_rss_mb": round(usage.ru_maxrss / 1024)}


def _bare(path: str) -> None:
    with Image.open(path) as img:
        img.draft("RGB", (224, 224))
        img.convert("RGB").resize((224, 224), Image.BILINEAR)


def bare_pillow_rate(files: list[Path]) -> float:
    workers = min(len(os.sched_getaffinity(0)), 8)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_bare, map(str, files), chunksize=32):
            pass
    return len(files) / (time.perf_counter() - started)


def build_store(n: int, work: Path, image_size: int, env: dict[str, str]) -> dict[str, object]:
    """``aepretrain data`` over the N photos into an empty cache: its memory, and the store's summary line."""
    shutil.rmtree(Path(env["AEPRETRAIN_CACHE"]), ignore_errors=True)
    data = measured([sys.executable, "-m", "aepretrain", "data", "--dataset", "folder", "--root",
                     str(work / f"photos-{n}"), "--image-size", str(image_size), "--out", str(work / f"data-{n}")], env)
    stored = re.search(r"stored (\d+) images of folder-all-\d+ \(([\d.]+ [MG]B).*\((\d+) images/s\)",
                       str(data["stderr"]))
    if data["rc"] != 0 or not stored:
        sys.exit(f"data failed for N={n}:\n{str(data['stderr'])[-2000:]}")
    return data | {"stored": int(stored.group(1)), "size": stored.group(2), "rate": int(stored.group(3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,8000,32000")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2, help="store builds per N, each between two bare loops")
    parser.add_argument("--work", default="/tmp/aepretrain-memory", help="folders, caches and runs go here")
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    try:
        for n in map(int, args.sizes.split(",")):
            files = photo_folder(work / f"photos-{n}", n)
            env = dict(os.environ, AEPRETRAIN_CACHE=str(work / f"cache-{n}"))
            bare, builds = [bare_pillow_rate(files)], []
            for _ in range(args.rounds):  # bare, build, bare, build, bare: this host's speed drifts
                builds.append(build_store(n, work, args.image_size, env))
                bare.append(bare_pillow_rate(files))
            run = measured([sys.executable, "-m", "aepretrain", "run", "--preset", "seed", "--smoke", "--quiet",
                            "--dataset", "synthetic", "--image-size", str(args.image_size), "--pretrain-data",
                            str(work / f"photos-{n}"), "--set", "probe.enabled=false", "--out", str(work / f"run-{n}"),
                            "--overwrite"], env)
            if run["rc"] != 0:
                print(f"run failed for N={n}:\n{str(run['stderr'])[-2000:]}", file=sys.stderr)
            metrics = json.loads((work / f"run-{n}" / "metrics.json").read_text()) if run["rc"] == 0 else {}
            decode = sum(int(b["rate"]) for b in builds) / len(builds)
            rows.append({"n": n, "stored": builds[0]["stored"], "store_size": builds[0]["size"],
                         "data_seconds": [b["seconds"] for b in builds],
                         "data_peak_pss_mb": max(int(b["peak_pss_mb"]) for b in builds),
                         "data_peak_anon_mb": max(int(b["peak_anon_mb"]) for b in builds),
                         "data_max_rss_mb": max(int(b["max_rss_mb"]) for b in builds),
                         "decode_img_s": [b["rate"] for b in builds], "bare_pillow_img_s": [round(b) for b in bare],
                         "ratio": round(decode / (sum(bare) / len(bare)), 2),
                         "run_rc": run["rc"], "run_seconds": run["seconds"], "run_peak_pss_mb": run["peak_pss_mb"],
                         "run_peak_anon_mb": run["peak_anon_mb"], "run_max_rss_mb": run["max_rss_mb"],
                         "pretrain_images": metrics.get("pretrain", {}).get("images")})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work / f"cache-{n}", ignore_errors=True)  # the next size starts from an empty cache
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| N | store | `data` s | `data` peak PSS MB (anonymous) | max RSS MB | decode img/s, each build "
          "| bare Pillow img/s, before, between, after | decode / bare (means) "
          "| `run --smoke` peak PSS MB (anonymous) | max RSS MB | pre-trained on |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['store_size']} | {', '.join(map(str, r['data_seconds']))} "
              f"| {r['data_peak_pss_mb']} ({r['data_peak_anon_mb']}) | {r['data_max_rss_mb']} "
              f"| {', '.join(map(str, r['decode_img_s']))} | {', '.join(map(str, r['bare_pillow_img_s']))} "
              f"| **{r['ratio']:.2f}** | {r['run_peak_pss_mb']} ({r['run_peak_anon_mb']}) | {r['run_max_rss_mb']} "
              f"| {r['pretrain_images']} |")


if __name__ == "__main__":
    main()
