"""Two nodes of one process each, on loopback, through Lightning's own cluster environment (MASTER_ADDR,
MASTER_PORT, NODE_RANK, as a launcher sets them on each node): the same weights as two processes on one node, one
data store built in the folder both nodes share, and only the first node writes the run folder."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import photo
from .test_ddp import TINY

CHECKPOINTS = ("pretrain-stage1", "pretrain-stage2", "pretrain-stage3", "classifier-pretrained", "classifier-scratch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aepretrain(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aepretrain", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    errs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, err[-3000:]
            errs.append(err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    return errs


def test_two_nodes_of_one_process_equal_two_processes_on_one_node(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(53):
        photo(i).save(photos / f"{i}.png")
    run = ["run", *TINY, "--pretrain-data", str(photos), "--set", "finetune.epochs=1", "--set", "probe.enabled=false"]
    launcher = ("NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    # one thread a process in both layouts (Lightning would give 1 to each of two processes on one machine and 2 to
    # the one process of a node): a convolution's sums in another order differ in the last bits
    base = {k: v for k, v in os.environ.items() if k not in launcher} | {"OMP_NUM_THREADS": "1"}
    one_node = tmp_path / "one-node"
    finish([aepretrain([*run, "--out", str(one_node), "--devices", "2", "--strategy", "ddp"],
                       dict(base, AEPRETRAIN_CACHE=str(tmp_path / "cache-one")))])

    two_nodes, shared_cache, port = tmp_path / "two-nodes", tmp_path / "cache-shared", str(free_port())
    nodes = [aepretrain([*run, "--out", str(two_nodes), "--devices", "1", "--num-nodes", "2", "--strategy", "ddp"],
                        dict(base, AEPRETRAIN_CACHE=str(shared_cache), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                             NODE_RANK=str(rank)))
             for rank in (0, 1)]
    errs = finish(nodes)

    assert sum(len(re.findall(r"^stored 53 images of folder-all-16 ", err, re.M)) for err in errs) == 1, errs
    assert len(list(shared_cache.glob("folder-all-16-*.npy"))) == 1
    assert "in use by process" not in errs[1]
    for name in CHECKPOINTS:
        single = load_file(one_node / "checkpoints" / f"{name}.safetensors")
        multi = load_file(two_nodes / "checkpoints" / f"{name}.safetensors")
        assert single.keys() == multi.keys()
        for key in single:
            assert torch.equal(single[key], multi[key]), f"{name}: {key} differs"
    assert (two_nodes / "report.html").is_file()
