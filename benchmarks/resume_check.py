"""Kill a `quick` fp32 run at three random points and resume it: every epoch must equal the unbroken run's.

Each kill lands 0-4 s (seeded) after the first epoch checkpoint of a different fit: greedy stage 2, the
pre-trained arm, the scratch arm. The run is then resumed with `--resume`, and metrics.json is compared with
the unbroken run's, per-epoch histories included (timings and resume bookkeeping aside).

    python benchmarks/resume_check.py --dir /tmp/resume-check
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import numbers  # noqa: E402  metrics.json without timings: the same comparison as the tests

ARGS = ["--precision", "32", "--seed", "11", "--quiet", "--set", "data.train_limit=8000",
        "--set", "pretrain.epochs=2", "--set", "finetune.epochs=4"]
FITS = ("stage2", "pretrained", "scratch")


def aepretrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "aepretrain", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="a scratch folder (its run folders are replaced)")
    parser.add_argument("--seed", type=int, default=2026, help="seeds the kill delays")
    dirs = parser.parse_args()
    base = dirs.dir
    base.mkdir(parents=True, exist_ok=True)
    started = time.time()
    shutil.rmtree(base / "unbroken", ignore_errors=True)
    subprocess.run(aepretrain("run", "--out", str(base / "unbroken"), *ARGS), check=True, stdout=subprocess.DEVNULL)
    print(f"unbroken run: {time.time() - started:.0f} s", flush=True)
    want = numbers(base / "unbroken")
    rng = random.Random(dirs.seed)
    equal_all = True
    for i, fit in enumerate(FITS, 1):
        delay = rng.uniform(0.0, 4.0)
        out = base / f"killed{i}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(aepretrain("run", "--out", str(out), *ARGS), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ckpt = out / "checkpoints" / "resume" / fit / "last.ckpt"
        while not ckpt.is_file() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = sorted(p.stem for p in (out / "checkpoints").glob("*.safetensors"))
        resumed = subprocess.run(aepretrain("run", "--out", str(out), "--resume"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        got = numbers(out)
        m = json.loads((out / "metrics.json").read_text())
        resumed_from = {f"stage{s['stage']}": s["resumed_from"] for s in m["pretrain"]["stages"]} | \
            {arm: a["resumed_from"] for arm, a in m["finetune"].items()}
        equal_all &= got == want
        print(f"kill {i}: {delay:.2f} s after {fit}'s first epoch checkpoint; finished before the kill: {finished}; "
              f"resume exit {resumed.returncode}; resumed_from {resumed_from}; every epoch and metric equal to the "
              f"unbroken run: {got == want}", flush=True)
    return 0 if equal_all else 1


if __name__ == "__main__":
    sys.exit(main())
