"""The pre-ranking scorer: an export's item index, its user tower, and MaxSim over the index.

    from scorer import Scorer
    Scorer("runs/RUN/export").recommend(user_id=1, top_k=10)

Used by infer.py (one request from the command line), serve.py (the HTTP service), benchmark.py and
run_experiments.py (latency). The FE score of one user against N items: per block of items, one matrix
product per item head over the contiguous head-major index ((block x p) by (p x L*H)), a running max over
the item heads and a sum (maxsim); a whole-catalogue request takes the C++ kernel over the index in tiles of a
vector register's width (MaxSimIndex, maxsim_index.cc) where it builds. Unknown users and items take the
out-of-vocabulary path (id 0, prior statistics) instead of failing.

The user tower runs through ONNX Runtime on the export's batch-1 user_tower.onnx when it is there (about
10x less dispatch than nn.GraphCell for this small graph; equal to the MINDIR within 1e-5, tested), else
through the MINDIR. maxsim() in float32 is the reference every other scoring path is tested against:
maxsim_batch (many users in one GEMM), CompressedIndex (int8 / bfloat16 / float16 storage, exact re-scoring
of a shortlist) and IVFRetriever (an inverted file over whole items routed by MaxSim, for large catalogues).
Measurements and what was rejected: docs/serving.md.
"""
import ctypes
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from get_dataset import hash_ids, unknown_inputs
from util import UserError, build_library, md5_file, read_json


def head_major(items):
    """(N, H, p) item-major vectors -> the contiguous (H, N, p) layout maxsim() reads."""
    return np.ascontiguousarray(np.asarray(items, np.float32).transpose(1, 0, 2))


MAXSIM_BLOCK = 32768  # items per block: the (block, L*H) buffers stay in cache (docs/serving.md)


def maxsim_buffers(user, items_by_head, block=MAXSIM_BLOCK):
    heads, n, dim = items_by_head.shape
    rows = max(1, min(n, block))
    return np.empty((rows, user.size // dim), np.float32), np.empty((rows, user.size // dim), np.float32)


def maxsim(user, items_by_head, out=None, block=MAXSIM_BLOCK):
    """FE-Block score of one user (L, H, p) against N items stored head-major, (H, N, p) -> (N,): the sum
    over the user's L*H heads of the max over each item's H heads of the dot product.

    Block by block of `block` items: one BLAS call per item head ((block, p) x (p, L*H), a contiguous slab of
    the head-major index), a running maximum over the heads and a matrix-vector product for the sum, so the
    dot products never leave the cache; only the index is read from memory. `out` may hold preallocated
    buffers (maxsim_buffers) for repeated calls."""
    heads, n, dim = items_by_head.shape
    dots, best = out if out is not None else maxsim_buffers(user, items_by_head, block)
    block = len(best)
    user = np.ascontiguousarray(user.reshape(-1, dim).T)
    ones = np.ones(user.shape[1], np.float32)
    result = np.empty(n, np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        d, b = dots[:stop - start], best[:stop - start]
        np.matmul(items_by_head[0, start:stop], user, out=b)
        for k in range(1, heads):
            np.matmul(items_by_head[k, start:stop], user, out=d)
            np.maximum(b, d, out=b)
        np.matmul(b, ones, out=result[start:stop])
    return result


MAXSIM_SPLIT = 4096  # fewest items per thread when a MaxSimIndex splits a request between threads


def cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def thread_pool():
    """The threads that score the other parts of a request split by MaxSimIndex.scores."""
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max(1, cores() - 1), thread_name_prefix="maxsim")


class MaxSimKernel(NamedTuple):
    """maxsim_index.cc loaded: score(user, U, p, tiles, H, first tile, last tile, out), and tile, the items per
    tile (the float width of the vector registers it was built for: 16 with AVX-512, 8 with AVX2)."""
    score: Callable
    tile: int


@functools.lru_cache(maxsize=None)
def maxsim_kernel(march="native"):
    """maxsim_index.cc through ctypes (built by util.build_library for this CPU, or the g++ -march given, once per
    process, ~1 s), a MaxSimKernel, or None where it cannot be built (no C++ compiler): scoring then runs in
    NumPy (maxsim)."""
    library = build_library(("maxsim_index.cc",), "MaxSim scores in NumPy", march)
    if library is None:
        return None
    library = ctypes.CDLL(str(library))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.MaxSimTiles.argtypes = [pointer, size, size, pointer, size, size, size, pointer]
    library.MaxSimTiles.restype = None
    library.MaxSimTileWidth.restype = size
    return MaxSimKernel(library.MaxSimTiles, library.MaxSimTileWidth())


class MaxSimIndex:
    """An item index (H, N, p) in the layout its MaxSim reads; scores(user) -> (N,) as maxsim(user, items_by_head).

    With the C++ kernel (`kernel`: maxsim_kernel(); maxsim_index.cc): the index re-laid in tiles of W items
    (kernel.tile: a vector register's floats, 16 with AVX-512), (T, H, p, W), zeros after the last item: each
    user value broadcast into a tile's sums, the index read once in order, no horizontal sums; on one thread
    more than one core's share of the GEMM peak (docs/serving.md); equal to maxsim() up to float32 rounding
    (tested); a copy of the index. The kernel runs without the GIL: concurrent requests score on separate
    cores, and scores(user, threads) splits one request's tiles between `threads` threads (at least
    MAXSIM_SPLIT items each). Without it (kernel None): the head-major array itself, scored by maxsim() in
    NumPy (with BLAS's threads)."""

    def __init__(self, items_by_head, kernel):
        heads, n, dim = items_by_head.shape
        self.n, self.heads, self.dim, self.kernel = n, heads, dim, kernel
        if kernel is None:  # maxsim() reads contiguous slabs of each head
            self.items = np.ascontiguousarray(items_by_head, np.float32)
            return
        w = kernel.tile
        full, rest = divmod(n, w)
        self.items = np.zeros((full + (rest > 0), heads, dim, w), np.float32)
        # items[t, k, j, l] = items_by_head[k, w t + l, j], assigned through views (no padded copy of the index)
        self.items[:full] = items_by_head[:, :full * w].reshape(heads, full, w, dim).transpose(1, 0, 3, 2)
        if rest:
            self.items[full, :, :, :rest] = items_by_head[:, full * w:].transpose(0, 2, 1)

    def scores(self, user, threads=1):
        if self.kernel is None:
            return maxsim(user, self.items)
        user = np.ascontiguousarray(user, np.float32).reshape(-1, self.dim)
        tiles = len(self.items)
        out = np.empty(tiles * self.kernel.tile, np.float32)
        score = functools.partial(self.kernel.score, user.ctypes.data, len(user), self.dim, self.items.ctypes.data,
                                  self.heads)
        parts = max(1, min(threads, self.n // MAXSIM_SPLIT))
        bounds = [tiles * i // parts for i in range(parts + 1)]
        others = [thread_pool().submit(score, a, b, out.ctypes.data) for a, b in zip(bounds[1:-1], bounds[2:])]
        score(bounds[0], bounds[1], out.ctypes.data)  # the first part in this thread
        for part in others:
            part.result()
        return out[:self.n]


def maxsim_batch(users, items_by_head):
    """maxsim() of B users (B, L, H, p) against the same N items (H, N, p) -> (B, N), with one GEMM for all
    users ((H*N, p) x (p, B*L*H)): the throughput mode, each item row is read once for the whole batch."""
    heads, n, dim = items_by_head.shape
    b = len(users)
    users = np.asarray(users, np.float32).reshape(b, -1, dim)
    dots = (items_by_head.reshape(heads * n, dim) @ users.reshape(-1, dim).T).reshape(heads, n, b, -1)
    return dots.max(0).sum(-1).T


def best_first(scores, k):
    """Positions of the k best scores, best first (stable among ties).

    Over large arrays, a threshold from a strided sample first keeps the few scores that can be in the top k
    (about 2k + 8 * len/4096 of them), so the selection runs on those only: exact, as the candidates are
    checked to hold at least k scores (else the whole array is used); 0.63 -> 0.04 ms for the top 100 of
    100,000 on this machine (docs/serving.md)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, np.int64)
    candidates, values = None, scores  # None: every position
    if n > 20_000 and 4 * k < n:
        step = n // 4096
        sample = np.sort(scores[::step])
        above = np.flatnonzero(scores >= sample[max(0, len(sample) - 2 * k // step - 8)])
        if len(above) >= k:
            candidates, values = above, scores[above]
    m = len(values)
    best = np.argpartition(values, m - k)[m - k:] if k < m else np.arange(m)
    best = np.sort(best if candidates is None else candidates[best])
    return best[np.argsort(-scores[best], kind="stable")]  # positions sorted first: ties in index order


class CompressedIndex:
    """A head-major index stored compressed and scored block by block: each block of `block` items is widened
    to float32 in a buffer that stays in cache, then scored as maxsim() does.

    kinds: "int8" (one scale per item head vector, symmetric), "bfloat16" (the upper 16 bits of float32),
    "float16". top_k() re-scores a shortlist of the approximate best exactly from the float32 index
    (ColBERT/PLAID style), so only the shortlist's membership is approximate."""

    KINDS = ("int8", "bfloat16", "float16")

    def __init__(self, items_by_head, kind, block=512):
        if kind not in self.KINDS:
            raise UserError(f"unknown index compression {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.exact, self.kind, self.block = items_by_head, kind, block
        heads, n, dim = items_by_head.shape
        if kind == "int8":
            self.scale = np.maximum(np.abs(items_by_head).max(-1, keepdims=True), 1e-12) / 127
            self.data = np.round(items_by_head / self.scale).astype(np.int8)
        elif kind == "bfloat16":  # round to nearest even on the dropped 16 bits
            bits = items_by_head.view(np.uint32)
            self.data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            self.data = items_by_head.astype(np.float16)
        self.nbytes = self.data.nbytes + (self.scale.nbytes if kind == "int8" else 0)

    def _widen(self, start, stop, out):
        part = self.data[:, start:stop]
        if self.kind == "int8":
            np.multiply(part, self.scale[:, start:stop], out=out)
        elif self.kind == "bfloat16":
            np.left_shift(part, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            out[...] = part

    def widened(self):
        """The whole compressed index back in float32 (H, N, p): what the compressed scores are exact for."""
        out = np.empty(self.data.shape, np.float32)
        self._widen(0, self.data.shape[1], out)
        return out

    def scores(self, user):
        """Approximate maxsim() over every item."""
        heads, n, dim = self.data.shape
        wide = np.empty((heads, self.block, dim), np.float32)
        result = np.empty(n, np.float32)
        for start in range(0, n, self.block):
            stop = min(n, start + self.block)
            self._widen(start, stop, wide[:, :stop - start])
            result[start:stop] = maxsim(user, wide[:, :stop - start])
        return result

    def top_k(self, user, k, shortlist=None):
        """(rows, exact scores) of the k best items: the `shortlist` (default 4k) best by the compressed
        index, re-scored exactly with float32 maxsim()."""
        rows = best_first(self.scores(user), max(k, shortlist or 4 * k))
        exact = maxsim(user, self.exact[:, rows])
        best = best_first(exact, k)
        return rows[best], exact[best]


class IVFRetriever:
    """Catalogue-scale retrieval: an inverted file over whole items, routed by MaxSim itself, then exact
    maxsim() on the items of the cells it picks.

    k-means clusters the items, each item's H head vectors concatenated (H*p dims), into `lists` cells
    (default sqrt(N)); each cell's items are stored as one contiguous head-major block (faiss's IVF-Flat
    layout, one entry per item; a MaxSimIndex: tiles for the C++ kernel `kernel`, else head-major). A query
    scores every centroid, read as H head vectors, with maxsim(), takes the `nprobe` best cells and scores all
    their items exactly: the shortlist is the probed cells, so its scores are exact and only its membership is
    approximate. nprobe=lists is exact MaxSim. The retriever keeps its own cell-ordered copy of the index.
    Recall and time on a 1,000,000-item catalogue: docs/serving.md."""

    def __init__(self, items_by_head, lists=None, iterations=8, seed=0, sample=64, chunk=16384, kernel=None):
        heads, n, dim = items_by_head.shape
        lists = max(1, min(lists or round(n ** 0.5), n))
        item_major = lambda rows: items_by_head[:, rows].transpose(1, 0, 2).reshape(-1, heads * dim)  # noqa: E731
        rng = np.random.default_rng(seed)
        train = item_major(np.sort(rng.choice(n, min(n, lists * sample), replace=False)))
        self.centroids = self._seeds(train, lists, rng)
        for _ in range(iterations if lists > 1 else 0):  # k-means on the sample
            near = self._nearest(train)
            sums = np.zeros_like(self.centroids)
            np.add.at(sums, near, train)
            counts = np.bincount(near, minlength=lists).astype(np.float32)[:, None]
            self.centroids = np.where(counts > 0, sums / np.maximum(counts, 1), self.centroids)
        cells = np.concatenate([self._nearest(item_major(slice(s, s + chunk))) for s in range(0, n, chunk)])
        self.items = np.argsort(cells, kind="stable")  # the index row of each stored item, cell by cell
        self.offsets = np.searchsorted(cells[self.items], np.arange(lists + 1))
        self.cells = [MaxSimIndex(items_by_head[:, self.items[a:b]], kernel)
                      for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        self.by_head_centroids = head_major(self.centroids.reshape(lists, heads, dim))

    @staticmethod
    def _seeds(points, lists, rng):
        """k-means++ seeding: each next centre drawn with probability proportional to the squared distance
        to the nearest centre so far (random seeds merge well-separated clusters into one cell, whose mean
        then ranks low for users who like one of them)."""
        centres = np.empty((lists, points.shape[1]), np.float32)
        centres[0] = points[rng.integers(len(points))]
        norms = (points * points).sum(1)
        nearest = np.full(len(points), np.inf, np.float32)
        for c in range(1, lists):
            last = centres[c - 1]
            np.minimum(nearest, norms - 2 * (points @ last) + last @ last, out=nearest)
            weights = np.maximum(nearest, 0)
            centres[c] = points[rng.choice(len(points), p=weights / weights.sum()) if weights.sum() > 0
                                else rng.integers(len(points))]
        return centres

    def _nearest(self, points):
        half_norms = (self.centroids * self.centroids).sum(1) / 2
        return np.argmax(points @ self.centroids.T - half_norms, 1)

    def probed(self, user, nprobe=16):
        """The user's `nprobe` best non-empty cells by MaxSim against the centroids."""
        return [c for c in best_first(maxsim(user, self.by_head_centroids), nprobe) if self.cells[c].n]

    def top_k(self, user, k, nprobe=16):
        """(index rows, exact MaxSim scores) of the k best items in the user's `nprobe` best cells, best first."""
        cells = self.probed(user, nprobe)
        scores = np.concatenate([self.cells[c].scores(user) for c in cells])
        rows = np.concatenate([self.items[self.offsets[c]:self.offsets[c + 1]] for c in cells])
        best = best_first(scores, k)
        return rows[best], scores[best]


class OnnxUserTower:
    """ONNX Runtime on the export's user_tower.onnx (fixed batch 1): one user per call, inputs and output
    bound once so a call is only the graph's own work."""

    def __init__(self, path, names, shapes):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a batch-1 MLP: a second thread buys nothing (measured), MaxSim wants it
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [np.zeros(shapes[k], dtype) for k, dtype in names]
        self.output = np.empty(self.session.get_outputs()[0].shape, np.float32)
        self.binding = self.session.io_binding()
        for node, array in zip(self.session.get_inputs(), self.inputs):
            self.binding.bind_cpu_input(node.name, array)
        self.binding.bind_output(self.session.get_outputs()[0].name, "cpu", 0, np.float32, list(self.output.shape),
                                 self.output.ctypes.data)
        self._lock = threading.Lock()  # the bound buffers are shared: one call at a time

    def __call__(self, arrays):
        with self._lock:
            for buffer, array in zip(self.inputs, arrays):
                buffer[...] = array
            self.session.run_with_iobinding(self.binding)
            return self.output[0].copy()


class Scorer:
    """Loads an export (manifest-checked) and scores candidates for users.

    With `nprobe` > 0, whole-catalogue requests take the two-stage path: an IVFRetriever over the index
    (built here, ~20 s per million items) returns the best of the user's `nprobe` best cells, scored exactly;
    requests with candidates are always scored exactly. `threads`: threads that score one whole-catalogue
    request with the C++ kernel (0: every core; 1 suits a service, whose concurrent requests share the cores)."""

    USER_TOWERS = ("auto", "onnx", "mindir")

    def __init__(self, export_dir, check_files=True, user_tower="auto", nprobe=0, threads=1):
        import mindspore as ms
        import pandas as pd
        from mindspore import nn
        if nprobe < 0:
            raise UserError(f"nprobe must be 0 (exact scoring) or positive, got {nprobe}")
        if threads < 0:
            raise UserError(f"threads must be 0 (every core) or positive, got {threads}")
        self.threads = threads or cores()
        if user_tower not in self.USER_TOWERS:
            raise UserError(f"unknown user tower backend {user_tower!r}; choose one of {', '.join(self.USER_TOWERS)}")
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
        self.item_ids = np.load(self.dir / "item_ids.npy")
        self.titles = json.loads((self.dir / "titles.json").read_text())
        users = np.load(self.dir / "users.npz")
        self.users = {k: users[k] for k in users.files}
        vocab = np.load(self.dir / "vocab.npz")
        self.vocab = {k: vocab[k] for k in vocab.files}
        self.user_rows = pd.Index(self.users["key"])  # built once: a lookup is then a hash probe
        self.item_rows = pd.Index(self.item_ids)
        # data sets with text ids (Amazon's reviewerID and asin): the keys are table positions, the raw ids names
        self.user_names = pd.Index(self.users["name"]) if "name" in self.users else None
        names = self.dir / "item_names.npy"
        self.item_names = np.load(names) if names.is_file() else None
        self.item_name_rows = pd.Index(self.item_names) if self.item_names is not None else None
        ms.set_context(mode=ms.GRAPH_MODE)
        # the MINDIR has a dynamic batch: it serves batches of users (user_vectors) and is the reference
        self.user_tower = nn.GraphCell(ms.load(str(self.dir / "user_tower.mindir")))
        has_onnx = "ONNX" in m.get("formats", {}).get("user_tower", []) and m.get("onnx_batch", {}).get("user_tower") == 1
        if user_tower == "onnx" and not has_onnx:
            raise UserError(f"{self.dir} has no batch-1 user_tower.onnx: export again, or use the mindir user tower")
        self.onnx_tower = None
        if user_tower == "onnx" or (user_tower == "auto" and has_onnx):
            try:
                self.onnx_tower = OnnxUserTower(self.dir / "user_tower.onnx",
                                                [(k, self.users[k].dtype) for k in m["user_inputs"]],
                                                {k: (1, *self.users[k].shape[1:]) for k in m["user_inputs"]})
            except ImportError:
                if user_tower == "onnx":
                    raise UserError("onnxruntime is not installed (pip install -r requirements.txt)") from None
        self.backend = "onnx" if self.onnx_tower else "mindir"
        self.bias = m["score_bias"]
        self.prior = m["prior"]  # the training positive rate: dense features of users without history
        self.checksum = md5_file(self.dir / "manifest.json")
        self.nprobe = nprobe  # a dot-product index is MaxSim with one head on each side
        self.kernel = kernel = maxsim_kernel() if self.fe or nprobe else None  # the C++ MaxSim where it builds
        catalogue = self.by_head[:, :-1] if self.fe else self.index[None, :-1]
        self.ivf = IVFRetriever(catalogue, kernel=kernel) if nprobe else None
        # whole-catalogue MaxSim (requests with candidates: maxsim on their rows); with the IVF, no second copy
        self.catalogue = MaxSimIndex(self.by_head, None if nprobe else kernel) if self.fe else None

    # ---- inputs
    def user_inputs(self, user_id, features=None):
        """The user tower's input arrays for one user: its row of the feature table when known, otherwise
        those of an unknown user (out-of-vocabulary ids, the prior); raw `features` of the user's sparse
        fields (e.g. {"gender": "F", "age": 25}) replace the ids of those fields."""
        m = self.manifest
        row = self.user_row(user_id)
        if row >= 0:
            inputs = {k: self.users[k][row:row + 1].copy() for k in m["user_inputs"]}
        else:
            inputs = unknown_inputs(m["towers"], "user", self.prior, m.get("dense_fills"))
        specs = m["towers"]["user"]["sparse"]
        fields = [f["name"] for f in specs]
        for name, value in (features or {}).items():
            if name not in fields:
                raise UserError(f"unknown user feature {name!r}; the user fields are {', '.join(fields)}")
            spec = specs[fields.index(name)]
            if spec.get("hash_buckets"):  # a hashed field has no vocabulary: its id is the value's hash
                inputs["user_sparse"][0, fields.index(name)] = hash_ids([value], spec["hash_buckets"])[0]
            else:
                hit = np.flatnonzero(self.vocab[name] == str(value))
                inputs["user_sparse"][0, fields.index(name)] = hit[0] + 1 if hit.size else 0
        return inputs, row >= 0

    def user_row(self, user_id):
        """The user's row in the feature table (-1: unknown): by its raw text id where the data set has text
        ids (a string), else by its integer key."""
        if isinstance(user_id, str) and self.user_names is not None:
            return int(self.user_names.get_indexer([user_id])[0])
        try:
            return int(self.user_rows.get_indexer([int(user_id)])[0])
        except ValueError:
            raise UserError(f"user id {user_id!r}: this data set's user ids are integers") from None

    def user_vector(self, user_id, features=None, backend=None):
        """The user's representation (L, H, p) (d for dot models) and whether the user is known; `backend`
        "mindir" forces the MINDIR graph (the reference the ONNX path is tested against)."""
        inputs, known = self.user_inputs(user_id, features)
        return self.tower(inputs, backend), known

    def tower(self, inputs, backend=None):
        """The user tower on one user's input arrays."""
        import mindspore as ms
        names = self.manifest["user_inputs"]
        if self.onnx_tower is not None and backend != "mindir":
            return self.onnx_tower([inputs[k] for k in names])
        return self.user_tower(*[ms.Tensor(inputs[k]) for k in names]).asnumpy()[0]

    def user_vectors(self, user_ids):
        """Representations (B, L, H, p) of many known or unknown users in one MINDIR call (dynamic batch)."""
        import mindspore as ms
        inputs = [self.user_inputs(u)[0] for u in user_ids]
        names = self.manifest["user_inputs"]
        return self.user_tower(*[ms.Tensor(np.concatenate([x[k] for x in inputs])) for k in names]).asnumpy()

    # ---- scoring
    def _item_rows(self, candidates):
        """Index rows of candidate item ids (-1: not in the index): raw text ids where the data set has them."""
        if self.item_name_rows is not None and any(isinstance(c, str) for c in candidates):
            return self.item_name_rows.get_indexer([str(c) for c in candidates])
        try:
            return self.item_rows.get_indexer(np.asarray(candidates, dtype=np.int64))
        except (ValueError, TypeError):
            raise UserError("candidate ids: this data set's item ids are integers") from None

    def unknown_items(self, candidates):
        """The candidate ids that have no row in the index (serve.py refuses them; infer.py scores them as OOV)."""
        return [c for c, row in zip(candidates, self._item_rows(candidates)) if row < 0]

    def rows(self, candidates):
        """Index rows of candidate item ids (unknown ids -> the out-of-vocabulary row)."""
        rows = self._item_rows(candidates)
        return np.where(rows < 0, self.manifest["oov_row"], rows)

    def scores(self, user, rows=None):
        """Logits of the user against index rows (None: the whole catalogue, scored in place)."""
        if not self.fe:
            return (self.index[:-1] if rows is None else self.index[rows]) @ user + self.bias
        if rows is not None:
            return maxsim(user, self.by_head[:, rows]) + self.bias
        return self.catalogue.scores(user, self.threads)[:-1] + self.bias  # the last row is the OOV item

    def recommend(self, user_id, candidates=None, top_k=10, features=None):
        started = time.perf_counter()
        user, known = self.user_vector(user_id, features)
        if candidates is not None and len(candidates) == 0:
            return {"user_id": user_id, "known_user": known, "candidates": 0, "items": []}
        ids = self.item_ids if candidates is None else np.asarray(candidates, dtype=object)
        rows = None if candidates is None else self.rows(list(candidates))
        if rows is None and self.ivf is not None:  # two-stage: the user's best cells, scored exactly
            best, logits = self.ivf.top_k(user, top_k, self.nprobe)
            picked, scores, count = best, logits.astype(np.float64) + self.bias, len(self.item_ids)
        else:
            logits = self.scores(user, rows)
            best = best_first(logits, top_k)
            all_rows = np.arange(len(self.item_ids)) if rows is None else rows
            picked, scores, count = all_rows[best], logits[best].astype(np.float64), len(logits)
        known_items = picked < len(self.item_ids)
        names = self.item_names
        items = [{"item_id": item, "name": str(names[row]) if names is not None and known else None,
                  "title": self.titles[row] if known else None, "known_item": known,
                  "score": score, "probability": prob}
                 for item, row, known, score, prob in zip(ids[best].tolist(), picked.tolist(), known_items.tolist(),
                                                          scores.tolist(), (1 / (1 + np.exp(-scores))).tolist())]
        return {"user_id": user_id, "known_user": known, "candidates": int(count), "items": items,
                "milliseconds": round((time.perf_counter() - started) * 1000, 3)}


def tiled_index(scorer, n):
    """`scorer`'s catalogue repeated to n rows, in its scoring layout: head-major (H, n, p) for FE models,
    (n, d) for dot-product models. Timing depends on shapes, not values: for latency measurements."""
    catalogue = scorer.index[:-1]
    tiled = np.resize(catalogue, (n, *catalogue.shape[1:]))
    return head_major(tiled) if scorer.fe else tiled


def tiled_scoring(scorer, n):
    """A call that scores n candidates (tiled_index) for one user as the scorer scores its whole catalogue: MaxSim
    (the C++ kernel where the scorer has it) for FE models, one matrix-vector product for dot-product models;
    time it with util.median_ms."""
    user = scorer.user_vector(int(scorer.users["key"][0]))[0]
    index = tiled_index(scorer, n)
    if not scorer.fe:
        return lambda: index @ user
    return functools.partial(MaxSimIndex(index, scorer.kernel).scores, user, scorer.threads)
