"""Data-parallel training with msrun on this machine's CPU (2 ranks over loopback)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train
from conftest import ROOT
from model_config import parse_args

pytestmark = pytest.mark.distributed
EPOCHS = 2  # small on purpose: these jobs are in the default suite (the proof that distribution works)
ARGS = ["--dataset", "synthetic", "--synthetic_users", "600", "--synthetic_items", "120", "--synthetic_ratings", "40",
        "--mlp", "32,16", "--heads", "2", "--head_dim", "8", "--embed_dim", "8", "--epochs", str(EPOCHS),
        "--lr", "0.003", "--dropout", "0", "--patience", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(tmp_path, script, *args, timeout=600, env=None):
    msrun_bin = shutil.which("msrun", path=str(Path(sys.executable).parent)) or shutil.which("msrun")
    if msrun_bin is None:
        pytest.skip("msrun is not installed beside this Python")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {}))  # workers start `python`
    cmd = [msrun_bin, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
           f"--log_dir={tmp_path / 'msrun'}", "--join=True", "--cluster_time_out=60", str(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    logs = sorted((tmp_path / "msrun").glob("*.log"))
    out.logs = "\n".join(f"--- {p.name}\n" + "\n".join(line for line in p.read_text(errors="replace").splitlines()
                                                       if "WARNING" not in line and "INFO" not in line)[-2000:]
                         for p in logs)
    return out


def log(run, rank):
    return [json.loads(line) for line in (run / f"log.rank{rank}.jsonl").read_text().splitlines()]


def test_two_ranks_identical_parameters_and_single_process_auc(tmp_path):
    data_dir = str(tmp_path / "data")
    out = msrun(tmp_path, ROOT / "train.py", *ARGS, "--batch_size", "128", "--data_dir", data_dir,
                "--run_dir", str(tmp_path / "dist"))
    assert out.returncode == 0, out.logs
    dist = tmp_path / "dist"
    r0, r1 = log(dist, 0), log(dist, 1)
    assert len(r0) == len(r1) == EPOCHS
    assert [r["params_md5"] for r in r0] == [r["params_md5"] for r in r1]  # identical weights every epoch
    assert [r["val_auc"] for r in r0] == [r["val_auc"] for r in r1]
    metrics = json.loads((dist / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # the same global batch (2 x 128) in one process: the AUC falls within the seed-to-seed spread
    cfg, _ = parse_args(ARGS)
    single = [train.train(cfg.replace(batch_size=256, data_dir=data_dir, seed=seed,
                                      run_dir=str(tmp_path / f"single{seed}")))["test"]["auc"]
              for seed in (cfg.seed, cfg.seed + 1, cfg.seed + 2)]
    assert min(single) - 0.01 <= metrics["test"]["auc"] <= max(single) + 0.01, (metrics["test"]["auc"], single)


def test_a_dying_rank_fails_the_job_visibly(tmp_path):
    wrapper = tmp_path / "failing_train.py"
    wrapper.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
real, calls = train.evaluate, []
def evaluate(*args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK_ID") == "1" and len(calls) == 2:
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)
train.evaluate = evaluate
sys.argv[0] = "train.py"
train.run_cli(train.main)
""")
    run = tmp_path / "run"
    # rank 1 fails in epoch 2; rank 0 then waits in epoch 3's all-reduce until msrun ends the job
    # MS_NODE_TIMEOUT: the scheduler notices the dead rank after 10 s without a heartbeat (default 30 s)
    out = msrun(tmp_path, wrapper, *ARGS, "--epochs", "3", "--batch_size", "128", "--data_dir", str(tmp_path / "data"),
                "--run_dir", str(run), env={"MS_NODE_TIMEOUT": "10"})
    assert out.returncode != 0
    assert "injected failure on rank 1" in out.stdout + out.stderr
    from mindspore import load_checkpoint
    for name in ("best.ckpt", "last.ckpt"):  # written before the failure, never half-written
        assert load_checkpoint(str(run / name))
    assert not (run / "metrics.json").exists()


def test_launch_script_usage():
    out = subprocess.run(["bash", "scripts/run_distribute_train.sh"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "usage:" in out.stderr
