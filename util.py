"""Small helpers shared by the commands: one-line errors, atomic writes, checksums, metrics, building the C++
kernels."""
import atexit
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _interrupted_hook(kind, value, tb, default=sys.excepthook):
    """Ctrl-C before a command's run_cli runs (while its modules import, ~1 s): one line and 128 + signal,
    not a traceback. Commands import util before their other modules so that this is in place early."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write(f"\n{str(value) or 'interrupted by SIGINT'}\n")
        sys.stderr.flush()
        os._exit(128 + getattr(value, "signum", signal.SIGINT))
    default(kind, value, tb)


sys.excepthook = _interrupted_hook

import numpy as np  # noqa: E402  (after the hook: importing NumPy is part of the start-up it covers)

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad input, missing file...): printed as one line, no traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command; str() says where and what to do next."""

    def __init__(self, signum, message=""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# Signals: SIGINT (Ctrl-C) and SIGTERM stop a command cleanly, in one of three modes:
#   raise : at once, as an Interrupted exception (start-up, evaluation, export...);
#   defer : at the end of a critical section (importing MindSpore, whose C++ initialisation aborts the
#           process if interrupted; writing a checkpoint);
#   flag  : at the next step boundary of the training loop (stop_requested()), so a compiled step is never
#           cut in half. MindSpore's runtime turns a SIGINT that arrives during a compiled step into a
#           SIGTERM to its own process, so such a Ctrl-C is reported as SIGTERM.
# A second signal, or a command stuck for GRACE_SECONDS in a call that cannot be interrupted (a compiled
# step waiting for a dead rank), ends the process at once: checkpoints are written atomically, so the last
# good one is intact either way.
GRACE_SECONDS = 10
_signals = {"pending": None, "mode": "raise"}


def _force_exit(signum, why):
    sys.stderr.write(f"\ninterrupted by {signal.Signals(signum).name} ({why}); stopping now, the last "
                     f"checkpoint is intact\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def _on_signal(signum, frame):
    if _signals["pending"] is not None:
        _force_exit(signum, "second signal")
    _signals["pending"] = signum
    if _signals["mode"] == "raise":
        raise Interrupted(signum)
    timer = threading.Timer(GRACE_SECONDS, _force_exit, (signum, f"no clean stop within {GRACE_SECONDS} s"))
    timer.daemon = True
    timer.start()


@contextlib.contextmanager
def signals_mode(mode):
    """Within the block, SIGINT/SIGTERM are handled as `mode` ('defer' or 'flag'); a signal deferred in it
    is raised as Interrupted when the block ends (unless an outer block defers it further)."""
    previous, _signals["mode"] = _signals["mode"], mode
    try:
        yield
    finally:
        _signals["mode"] = previous
    if previous == "raise" and _signals["pending"] is not None:
        raise Interrupted(_signals["pending"])


def stop_requested():
    """The signal number received in 'flag' mode (None if none): the caller stops at this boundary."""
    return _signals["pending"]


def run_cli(main):
    """Run a command's main(): a UserError becomes `error: ...` on stderr and exit status 1; SIGINT and
    SIGTERM become one line `interrupted ...` and exit status 130 or 143 (128 + the signal)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup / background jobs keep ignoring them
            signal.signal(signum, _on_signal)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: no space left on the device{where}; files are written atomically, so nothing is "
              f"half-written: free some space and run the command again", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:  # Interrupted, or a plain Ctrl-C
        print(f"\n{str(e) or 'interrupted by SIGINT'}", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def say(message):
    """Print a log line without breaking a running tqdm bar."""
    from tqdm import tqdm
    tqdm.write(str(message))


# ---------------------------------------------------------------- files

def build_library(sources, fallback, march="native"):
    """The C++ files `sources` (next to this file) built with g++ (-O3, for this CPU: -march=native) into one
    shared library in a temporary folder removed at exit (~1-2 s): its path, or None where there is no working
    compiler, with `fallback` (what runs instead) and the reason on stderr."""
    folder = Path(tempfile.mkdtemp(prefix="inttower-kernels-"))
    atexit.register(shutil.rmtree, folder, True)
    library = folder / "kernels.so"
    command = ["g++", "-O3", f"-march={march}", "-fopenmp-simd", "-shared", "-fPIC", "-o", str(library),
               *(str(Path(__file__).with_name(name)) for name in sources)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        why = getattr(e, "stderr", None) or str(e)
        print(f"note: {fallback} (the C++ kernels did not build: {why.strip()[:300]})", file=sys.stderr)
        return None
    return library


def median_ms(fn, repeats):
    """Median wall time of `repeats` calls of fn(), in milliseconds, after one untimed call (first touch)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def rss_anon_mb():
    """This process's anonymous resident memory in MB (Linux /proc; None elsewhere): RSS without the pages of
    memory-mapped files, which the kernel can drop, so it shows what the process itself holds."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024)


def md5_bytes(data):
    return hashlib.md5(data).hexdigest()


def md5_file(path, chunk=1 << 22):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write):
    """Call write(tmp_path) and move the result onto `path` only once it is complete.

    A crash or an exception leaves `path` as it was (the old file, or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the file's suffix: some writers (ms.save_checkpoint) append theirs
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        # the temporary file, and any file a writer derived from its name (MindSpore's save_checkpoint writes
        # <name>.tmp first and leaves it behind when the disk is full)
        for leftover in Path(tmp).parent.glob(Path(tmp).stem + "*"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
            f.write("\n")
    atomic_write(path, write)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path, what="file"):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory under a temporary name; it appears at `path` only if the block succeeds.

    If another process built the same directory meanwhile (ranks of a distributed job), its copy is
    kept and ours dropped: the contents are the same by construction (the name is a content key)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- metrics

def auc(labels, scores):
    """ROC AUC over the whole set (never a mean of per-batch AUCs); nan if only one class."""
    from sklearn.metrics import roc_auc_score  # here, not at the top: importing sklearn takes ~1 s
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def logloss(labels, probs, eps=1e-7):
    labels = np.asarray(labels, np.float64)
    probs = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))


def gauc(groups, labels, scores):
    """User-averaged AUC: the AUC of each user's rows, weighted by the user's row count.

    Users whose rows are all positive or all negative have no AUC and are left out, as usual.
    Vectorised: ranks within each (group) are computed with one lexsort, ties get mean ranks."""
    groups, labels, scores = (np.asarray(a) for a in (groups, labels, scores))
    if groups.size == 0:
        return float("nan")
    order = np.lexsort((scores, groups))
    g, y, s = groups[order], labels[order].astype(np.float64), scores[order]
    n = g.size
    # mean rank of ties (same group and same score), 1-based within each group
    new_run = np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], n]
    group_start_of = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], np.arange(n), 0))
    ranks = (run_start + run_end - 1) / 2.0 - group_start_of[run_start] + 1
    rank = ranks[run_id]
    uniq, first, counts = np.unique(g, return_index=True, return_counts=True)
    pos = np.add.reduceat(y, first)
    neg = counts - pos
    rank_pos = np.add.reduceat(rank * y, first)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    per_group = (rank_pos[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return float(np.average(per_group, weights=counts[ok]))
