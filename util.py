"""Small helpers shared by the commands: one-line errors, atomic writes, checksums, metrics."""
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad input, missing file...): printed as one line, no traceback."""


def run_cli(main):
    """Run a command's main(); a UserError becomes `error: ...` on stderr and exit status 1."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def say(message):
    """Print a log line without breaking a running tqdm bar."""
    from tqdm import tqdm
    tqdm.write(str(message))


# ---------------------------------------------------------------- files

def median_ms(fn, repeats):
    """Median wall time of `repeats` calls of fn(), in milliseconds, after one untimed call (first touch)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


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
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
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
