"""The pre-ranking scorer: an export's item index, its user tower, and MaxSim over the index.

    from scorer import Scorer
    Scorer("runs/RUN/export").recommend(user_id=1, top_k=10)

Used by infer.py (one request from the command line), benchmark.py and run_experiments.py (latency).
The FE score of one user against N items is one matrix product over the contiguous index
(N*H x p by p x L*H), a max over item heads and a sum. Unknown users and items take the
out-of-vocabulary path (id 0, prior statistics) instead of failing.
"""
import json
import time
from pathlib import Path

import numpy as np

from get_dataset import unknown_inputs
from util import UserError, md5_file, read_json


def head_major(items):
    """(N, H, p) item-major vectors -> the contiguous (H, N, p) layout maxsim() reads."""
    return np.ascontiguousarray(np.asarray(items, np.float32).transpose(1, 0, 2))


def maxsim_buffers(user, items_by_head):
    heads, n, dim = items_by_head.shape
    return np.empty((heads * n, user.size // dim), np.float32), np.empty((n, user.size // dim), np.float32)


def maxsim(user, items_by_head, out=None):
    """FE-Block score of one user (L, H, p) against N items stored head-major, (H, N, p) -> (N,): the sum
    over the user's L*H heads of the max over each item's H heads of the dot product.

    One BLAS call for all dot products ((H*N, p) x (p, L*H)); head-major storage makes the max over
    item heads a running maximum of contiguous (N, L*H) slabs, and the sum a matrix-vector product.
    `out` may hold preallocated buffers (dots (H*N, L*H), best (N, L*H)) for repeated calls."""
    heads, n, dim = items_by_head.shape
    dots, best = out if out is not None else maxsim_buffers(user, items_by_head)
    user = user.reshape(-1, dim)
    np.matmul(items_by_head.reshape(heads * n, dim), user.T, out=dots)
    dots = dots.reshape(heads, n, -1)
    np.maximum(dots[0], dots[1 % heads], out=best)
    for k in range(2, heads):
        np.maximum(best, dots[k], out=best)
    return best @ np.ones(len(user), np.float32)


class Scorer:
    """Loads an export (manifest-checked) and scores candidates for users."""

    def __init__(self, export_dir, check_files=True):
        import mindspore as ms
        from mindspore import nn
        self.dir = Path(export_dir)
        if not (self.dir / "manifest.json").is_file():
            raise UserError(f"{self.dir} is not an export (no manifest.json): run python export.py --run_dir RUN")
        self.manifest = m = read_json(self.dir / "manifest.json", "export manifest")
        if check_files:
            for name, digest in m["files"].items():
                path = self.dir / name
                if not path.is_file() or md5_file(path) != digest:
                    raise UserError(f"{path} does not match {self.dir / 'manifest.json'} (missing, changed or "
                                    f"from another export): export again")
        index = np.load(self.dir / "item_index.npy")
        if list(index.shape[1:]) != m["item_shape"] or len(index) != m["items"] + 1:
            raise UserError(f"item index {index.shape} does not match the manifest "
                            f"({m['items']} + 1 items of {m['item_shape']})")
        self.fe = m["scoring"] == "maxsim"
        if self.fe:  # one copy in memory: the head-major scoring layout (see maxsim), and an item-major view of it
            self.by_head = head_major(index)
            self.index = self.by_head.transpose(1, 0, 2)
        else:
            self.by_head, self.index = None, np.ascontiguousarray(index, np.float32)
        self._buffers = None
        self.item_ids = np.load(self.dir / "item_ids.npy")
        self.titles = json.loads((self.dir / "titles.json").read_text())
        users = np.load(self.dir / "users.npz")
        self.users = {k: users[k] for k in users.files}
        vocab = np.load(self.dir / "vocab.npz")
        self.vocab = {k: vocab[k] for k in vocab.files}
        ms.set_context(mode=ms.GRAPH_MODE)
        self.user_tower = nn.GraphCell(ms.load(str(self.dir / "user_tower.mindir")))
        self.bias = m["score_bias"]
        self.prior = m["prior"]  # the training positive rate: dense features of users without history

    # ---- inputs
    def user_inputs(self, user_id, features=None):
        """The user tower's input arrays for one user: its row of the feature table when known, otherwise
        those of an unknown user (out-of-vocabulary ids, the prior); raw `features` of the user's sparse
        fields (e.g. {"gender": "F", "age": 25}) replace the ids of those fields."""
        import pandas as pd
        m = self.manifest
        row = int(pd.Index(self.users["key"]).get_indexer([user_id])[0])
        if row >= 0:
            inputs = {k: self.users[k][row:row + 1].copy() for k in m["user_inputs"]}
        else:
            inputs = unknown_inputs(m["towers"], "user", self.prior)
        fields = [f["name"] for f in m["towers"]["user"]["sparse"]]
        for name, value in (features or {}).items():
            if name not in fields:
                raise UserError(f"unknown user feature {name!r}; the user fields are {', '.join(fields)}")
            hit = np.flatnonzero(self.vocab[name] == str(value))
            inputs["user_sparse"][0, fields.index(name)] = hit[0] + 1 if hit.size else 0
        return inputs, row >= 0

    def user_vector(self, user_id, features=None):
        import mindspore as ms
        inputs, known = self.user_inputs(user_id, features)
        out = self.user_tower(*[ms.Tensor(inputs[k]) for k in self.manifest["user_inputs"]]).asnumpy()
        return out[0], known

    # ---- scoring
    def rows(self, candidates):
        """Index rows of candidate movie ids (unknown ids -> the out-of-vocabulary row)."""
        import pandas as pd
        rows = pd.Index(self.item_ids).get_indexer(np.asarray(candidates, dtype=np.int64))
        return np.where(rows < 0, self.manifest["oov_row"], rows)

    def scores(self, user, rows=None):
        """Logits of the user against index rows (None: the whole catalogue, scored in place)."""
        if not self.fe:
            return (self.index[:-1] if rows is None else self.index[rows]) @ user + self.bias
        if rows is not None:
            return maxsim(user, self.by_head[:, rows]) + self.bias
        if self._buffers is None:  # whole-catalogue requests reuse their buffers
            self._buffers = maxsim_buffers(user, self.by_head)
        return maxsim(user, self.by_head, self._buffers)[:-1] + self.bias  # the last row is the OOV item

    def recommend(self, user_id, candidates=None, top_k=10, features=None):
        started = time.perf_counter()
        user, known = self.user_vector(user_id, features)
        if candidates is not None and len(candidates) == 0:
            return {"user_id": user_id, "known_user": known, "candidates": 0, "items": []}
        ids = self.item_ids if candidates is None else np.asarray(candidates, dtype=np.int64)
        rows = None if candidates is None else self.rows(ids)
        logits = self.scores(user, rows)
        k = min(top_k, len(logits))
        best = np.argpartition(-logits, k - 1)[:k] if k < len(logits) else np.arange(len(logits))
        best = best[np.argsort(-logits[best], kind="stable")]
        all_rows = np.arange(len(self.item_ids)) if rows is None else rows
        items = [{"movie_id": int(ids[i]), "title": self.titles[all_rows[i]] if all_rows[i] < len(self.titles) else None,
                  "known_item": bool(all_rows[i] < len(self.item_ids)), "score": float(logits[i]),
                  "probability": float(1 / (1 + np.exp(-logits[i])))} for i in best]
        return {"user_id": user_id, "known_user": known, "candidates": int(len(logits)), "items": items,
                "milliseconds": round((time.perf_counter() - started) * 1000, 3)}


def tiled_index(scorer, n):
    """`scorer`'s catalogue repeated to n rows, in its scoring layout: head-major (H, n, p) for FE models,
    (n, d) for dot-product models. Timing depends on shapes, not values: for latency measurements."""
    catalogue = scorer.index[:-1]
    tiled = np.resize(catalogue, (n, *catalogue.shape[1:]))
    return head_major(tiled) if scorer.fe else tiled


def tiled_scoring(scorer, n):
    """A call that scores n candidates (tiled_index) for one user: MaxSim for FE models, one matrix-vector
    product for dot-product models; time it with util.median_ms."""
    user = scorer.user_vector(int(scorer.users["key"][0]))[0]
    index = tiled_index(scorer, n)
    if not scorer.fe:
        return lambda: index @ user
    buffers = maxsim_buffers(user, index)
    return lambda: maxsim(user, index, buffers)
