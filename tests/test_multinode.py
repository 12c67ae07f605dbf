"""The multi-node torchrun command of docs/training.md, with two local "nodes" of one process each."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from test_training import _cli_args

from utils.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_with_c10d_rendezvous_train_together(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                str(REPO / "train_scst.py"),
                *_cli_args(tiny_dataset, out),
                "--stop_after_steps",
                "2",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    log = (out / "train.log").read_text()
    assert "batch 8 on 2 process(es)" in log  # one process per node, batch 4 each
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "train"] == [1, 2]
    state = read_checkpoint(out / "last.pt")["train_state"]
    assert state["counters"]["global_step"] == 2 and len(state["rng_ranks"]) == 2  # gathered from both nodes
