"""util.py: metrics against sklearn, atomic writes."""
import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from util import atomic_dir, atomic_write, auc, gauc, logloss


def test_gauc_equals_per_user_auc_weighted_by_rows():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 2000)
    labels = (rng.random(2000) < 0.6).astype(np.float32)
    scores = np.round(rng.random(2000) + labels * 0.3, 2)  # rounding makes ties
    total, weight = 0.0, 0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            total += roc_auc_score(labels[m], scores[m]) * m.sum()
            weight += m.sum()
    assert gauc(users, labels, scores) == pytest.approx(total / weight, abs=1e-12)


def test_auc_and_logloss_match_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.3).astype(np.float32)
    p = np.clip(rng.random(500), 0.01, 0.99)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert logloss(y, p) == pytest.approx(log_loss(y, p))
    assert np.isnan(auc(np.ones(5), p[:5])) and np.isnan(gauc([1, 1], [1, 1], [0.2, 0.3]))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_dir_appears_only_when_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "d") as tmp:  # built meanwhile by another process: the first copy stays
        (tmp / "a").write_text("2")
    assert (tmp_path / "d" / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["d"]
