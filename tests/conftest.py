"""Shared fixtures: small data sets written in the exact GroupLens formats, and a tiny config."""
import gzip
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_config import Config  # noqa: E402

REAL_ML1M = Path(os.environ.get("INTTOWER_ML1M", ROOT.parent / "shared" / "data" / "ml-1m"))


# Tests of the C++ kernels (batch_norm.cc, maxsim.cc, maxsim_index.cc): without g++ training falls back to MindSpore
# ops and scoring to NumPy
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here: the C++ kernels cannot be built "
                               "(training falls back to the ops form, scoring to NumPy, both tested too)")


def real_file(name):
    """A genuine ML-1M file, or skip the test saying where it was looked for."""
    path = REAL_ML1M / name
    if not path.exists():
        pytest.skip(f"genuine MovieLens file {path} not present (set INTTOWER_ML1M to its folder)")
    return path


def write_ml1m(folder, ratings, users=None, movies=None, gz=False, encoding="latin-1"):
    """Write ratings/users/movies in the ML-1M '::' format; rows are tuples (or raw lines as str)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if users is None:
        ids = sorted({r[0] for r in ratings if not isinstance(r, str)})
        users = [(u, "MF"[u % 2], (1, 18, 25, 35, 45, 50, 56)[u % 7], u % 21, f"{10000 + u}") for u in ids]
    if movies is None:
        ids = sorted({r[1] for r in ratings if not isinstance(r, str)})
        genres = ["Comedy", "Drama|Romance", "Action|Adventure|Sci-Fi", "Children's|Animation"]
        movies = [(m, f"Movie {m} (1999)", genres[m % 4]) for m in ids]
    def lines(rows):
        text = "".join((r if isinstance(r, str) else "::".join(map(str, r))) + "\n" for r in rows)
        return text.encode(encoding)
    name = "ratings.dat.gz" if gz else "ratings.dat"
    data = lines(ratings)
    (folder / name).write_bytes(gzip.compress(data) if gz else data)
    (folder / "users.dat").write_bytes(lines(users))
    (folder / "movies.dat").write_bytes(lines(movies))
    return folder


def random_ratings(n_users=40, n_items=30, per_user=12, seed=0, timestamp=True):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        for m in rng.choice(np.arange(1, n_items + 1), per_user, replace=False):
            row = (u, int(m), int(rng.integers(1, 6)))
            rows.append(row + (int(978300000 + rng.integers(0, 10**7)),) if timestamp else row)
    return rows


@pytest.fixture
def tiny_cfg(tmp_path):
    """A config on a small generated sample, with everything under tmp_path."""
    return Config(dataset="synthetic", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "runs"),
                  synthetic_users=400, synthetic_items=150, synthetic_ratings=40,
                  mlp=(32, 16), heads=2, head_dim=8, embed_dim=8, batch_size=256, eval_batch_size=1024,
                  epochs=2, dropout=0.0)


def train_and_export(tmp, epochs, export_dir=None):
    """A small IntTower trained on a generated sample under `tmp` and exported (to RUN/export, or
    export_dir): the serving tests' model. Returns its config."""
    import train
    from export import export_run
    cfg = Config(dataset="synthetic", data_dir=str(tmp / "data"), run_dir=str(tmp / "run"), synthetic_users=300,
                 synthetic_items=120, synthetic_ratings=30, mlp=(32, 16), heads=2, head_dim=8, embed_dim=8,
                 batch_size=256, epochs=epochs, dropout=0.0, lr=0.005)
    train.train(cfg)
    overrides = {"run_dir"} | ({"output_dir"} if export_dir else set())
    export_run(Config(run_dir=cfg.run_dir, output_dir=str(export_dir or "runs")), overrides)
    return cfg
