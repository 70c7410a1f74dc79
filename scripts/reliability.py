"""The fault matrix behind docs/reliability.md: bad data files, damaged checkpoints, signals, an offline
download and a full disk, each tried from the command line as a user meets it.

    python scripts/reliability.py > table.md     # ~5 minutes on 2 cores; root for the tmpfs (docs/reliability.md)

Every case prints one table row: the fault, what ran, the exit status, the last line the command printed,
and the check that nothing was lost or half-written. The disk-full cases mount small tmpfs folders
(root only; skipped otherwise).
"""
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--synthetic_users", "300", "--synthetic_items", "120", "--synthetic_ratings", "30",
         "--mlp", "32,16", "--heads", "2", "--head_dim", "8", "--embed_dim", "8", "--batch_size", "256"]
ROWS = []


def run(*args, timeout=300):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return out.returncode, last_line(out.stdout + "\n" + out.stderr)


def last_line(text):
    lines = [x.strip() for x in text.replace("\r", "\n").splitlines() if x.strip() and "step/s" not in x]
    return lines[-1] if lines else ""


def row(fault, command, code, line, check):
    line = line.replace("|", "\\|").replace(str(TMP), "…")
    ROWS.append(f"| {fault} | `{command}` | {code} | {line[:160]} | {check} |")
    print(ROWS[-1], file=sys.stderr, flush=True)


def loads(path):
    code = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import runtime; "
                           f"runtime.read_checkpoint({str(path)!r})"], capture_output=True).returncode
    return code == 0


def write_ml1m(folder, ratings=b"1::1::5::978300760\n2::1::3::978300761\n", users=None, movies=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_bytes(ratings)
    (folder / "users.dat").write_bytes(users or b"1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_bytes(movies or b"1::Toy Story (1995)::Animation|Children's|Comedy\n")
    return folder


def data_faults():
    cases = {
        "missing file": TMP / "nowhere",
        "empty ratings file": write_ml1m(TMP / "empty", b""),
        "wrong separator": write_ml1m(TMP / "sep", b"1,1,5,978300760\n"),
        "non-numeric rating": write_ml1m(TMP / "nonnum", b"1::1::five::978300760\n"),
        "rating out of range": write_ml1m(TMP / "range", b"1::1::7::978300760\n"),
        "random bytes": write_ml1m(TMP / "random", os.urandom(4096)),
    }
    good = write_ml1m(TMP / "good")
    with zipfile.ZipFile(TMP / "ml-1m.zip", "w") as z:
        for name in ("ratings.dat", "users.dat", "movies.dat"):
            z.write(good / name, f"ml-1m/{name}")
    data = (TMP / "ml-1m.zip").read_bytes()
    (TMP / "truncated.zip").write_bytes(data[:len(data) // 2])
    cases["truncated zip"] = TMP / "truncated.zip"
    gz = write_ml1m(TMP / "gz")
    (gz / "ratings.dat").unlink()
    (gz / "ratings.dat.gz").write_bytes(gzip.compress((good / "ratings.dat").read_bytes() * 50)[:-20])
    cases["truncated gzip"] = gz / "ratings.dat.gz"
    for fault, path in cases.items():
        cache = TMP / "cache-data"
        code, line = run("get_dataset.py", "--data_path", path, "--data_dir", cache)
        half = [p for p in cache.rglob("*") if ".tmp" in p.name] if cache.exists() else []
        row(f"data: {fault}", f"get_dataset.py --data_path {path.name}", code, line,
            "no cache written" if not (cache / "cache").exists() and not half else f"LEFT {half or 'a cache'}")


def checkpoint_faults(run_dir):
    for fault in ("truncated", "8 bytes flipped"):
        other = TMP / f"ckpt-{fault.split()[0]}"
        shutil.copytree(run_dir, other)
        data = bytearray((other / "best.ckpt").read_bytes())
        if fault == "truncated":
            data = data[:len(data) // 2]
        else:
            for i in range(8):
                data[len(data) // 2 + 37 * i] ^= 255
        (other / "best.ckpt").write_bytes(bytes(data))
        before = (other / "export" / "manifest.json").read_bytes()
        code, line = run("eval.py", "--run_dir", other)
        row(f"checkpoint: {fault}", "eval.py --run_dir RUN", code, line, "no eval.json" if not (other / "eval.json").exists() else "eval.json WRITTEN")
        code, line = run("export.py", "--run_dir", other)
        kept = (other / "export" / "manifest.json").read_bytes() == before
        row(f"checkpoint: {fault}", "export.py --run_dir RUN", code, line, "old export kept" if kept else "EXPORT REPLACED")
    two = TMP / "two-tower"
    run("train.py", *SMALL, "--model", "two_tower", "--epochs", "1", "--data_dir", TMP / "data", "--run_dir", two)
    code, line = run("eval.py", "--run_dir", run_dir, "--checkpoint", two / "best.ckpt")
    row("checkpoint: another model's", "eval.py --run_dir RUN --checkpoint TWO_TOWER/best.ckpt", code, line, "refused")
    other_data = TMP / "other-sample"
    run("get_dataset.py", "--dataset", "synthetic", "--synthetic_users", "200", "--synthetic_items", "90",
        "--data_dir", other_data)
    sample = next((other_data).glob("synthetic-*"))
    code, line = run("eval.py", "--run_dir", run_dir, "--data_path", sample, "--data_dir", other_data)
    row("checkpoint: another data set's", "eval.py --run_dir RUN --data_path OTHER", code, line, "refused")


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "train.py", *SMALL, "--epochs", "40", "--patience", "0",
                             "--data_dir", TMP / "data", "--run_dir", run_dir, *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(proc, needle):
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line or needle in line:
            return


def resume_check(run_dir):
    if not run_dir.exists():
        return "no run folder left"
    if not (run_dir / "last.ckpt").exists():  # killed between the first checkpoints: resume starts over
        code, _ = run("train.py", "--resume", run_dir, "--epochs", "1")
        return "no last.ckpt yet; --resume starts it over, exit 0" if code == 0 else f"--resume FAILED ({code})"
    if not loads(run_dir / "last.ckpt"):
        return "LAST CHECKPOINT UNREADABLE"
    code, _ = run("train.py", "--resume", run_dir, "--epochs", "41")
    return "last.ckpt verified; --resume exit 0" if code == 0 else f"--resume FAILED ({code})"


def signal_faults():
    for name, sig, when in (("SIGINT at start-up (1 s)", signal.SIGINT, 1.0), ("SIGKILL at start-up (1 s)", signal.SIGKILL, 1.0),
                            ("SIGINT mid-epoch", signal.SIGINT, "epoch 1:"), ("SIGTERM mid-epoch", signal.SIGTERM, "epoch 1:"),
                            ("SIGKILL mid-epoch", signal.SIGKILL, "epoch 1:")):
        run_dir = TMP / f"sig-{name.split()[0]}-{len(ROWS)}"
        proc = start(run_dir)
        if isinstance(when, float):
            time.sleep(when)
        else:
            wait_for(proc, when)
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
        row(f"signal: {name}", f"train.py, then kill -{sig.name[3:]}", proc.returncode, last_line(out), resume_check(run_dir))
    # SIGKILL while checkpoints are being written: tiny epochs, so most of the time goes to validation and saving
    ok, trials = 0, 5
    for k in range(trials):
        run_dir = TMP / f"kill-save-{k}"
        proc = start(run_dir, "--synthetic_users", "60", "--batch_size", "64")
        wait_for(proc, "epoch 2:")
        time.sleep(0.05 * k)
        proc.kill()
        proc.wait()
        ok += resume_check(run_dir).startswith("last.ckpt verified")
    row("signal: SIGKILL during checkpoint writes", f"train.py (tiny epochs), kill -KILL, {trials} times", -9,
        "(killed)", f"{ok}/{trials} resumed from a verified last.ckpt")


def offline_download():
    code, line = run("get_dataset.py", "--download", "--download_url", "http://127.0.0.1:9", "--data_dir", TMP / "dl")
    row("offline download", "get_dataset.py --download (no network)", code, line, "nothing written" if not list((TMP / "dl").glob("ml-1m*")) else "LEFT FILES")


def mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def disk_full():
    full = TMP / "full-cache"
    if not mount_tmpfs(full, "64k"):
        row("disk full", "(tmpfs)", "-", "skipped: mounting a tmpfs needs root", "-")
        return
    try:
        code, line = run("get_dataset.py", *SMALL[:8], "--data_dir", full)
        half = [p.name for p in full.rglob("*") if ".tmp" in p.name]
        row("disk full: the cache", "get_dataset.py --data_dir FULL (64 KB tmpfs)", code, line,
            "nothing half-written" if not half and not list(full.glob("cache/*/meta.json")) else f"LEFT {half}")
    finally:
        subprocess.run(["umount", str(full)])
    full = TMP / "full-run"
    mount_tmpfs(full, "200k")
    try:
        code, line = run("train.py", *SMALL, "--epochs", "3", "--data_dir", TMP / "data", "--run_dir", full / "run")
        half = [p.name for p in full.rglob("*") if ".tmp" in p.name]
        row("disk full: a checkpoint", "train.py --run_dir FULL/run (200 KB tmpfs)", code, line,
            "nothing half-written" if not half else f"LEFT {half}")
    finally:
        subprocess.run(["umount", str(full)])


def main():
    global TMP
    TMP = Path(tempfile.mkdtemp(prefix="reliability-"))
    try:
        run_dir = TMP / "run"
        code, line = run("train.py", *SMALL, "--epochs", "2", "--data_dir", TMP / "data", "--run_dir", run_dir)
        assert code == 0, line
        assert run("export.py", "--run_dir", run_dir)[0] == 0
        data_faults()
        checkpoint_faults(run_dir)
        signal_faults()
        offline_download()
        disk_full()
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    print("| fault | command | exit | last line printed | nothing lost |")
    print("|---|---|---|---|---|")
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
