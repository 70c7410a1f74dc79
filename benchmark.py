"""Speed measurements behind docs/performance.md (medians of several repeats).

    python benchmark.py train [--peer torch] [--key value ...]   # our train step vs the published loop
                                                  # (and eager PyTorch), same model & data
    python benchmark.py data  [--key value ...]   # preprocessing time; npz vs MindRecord loading
    python benchmark.py serve --run_dir RUN [--last_layer_run RUN2]   # serving figures (docs/serving.md)
    python benchmark.py profile [--peer torch] [--key value ...] # profilers: time per operator type of a train step

Config keys (--data_path, --protocol, --model...) are those of train.py and pick the data the same
way (e.g. --data_path ../shared/data/ml-1m/ratings-all-users-no-timestamp.dat.gz --protocol paper for
all 1,000,209 genuine ratings); the benchmark's own keys are --repeats and --steps.
The result is printed as JSON at the end, on stdout; progress lines go to stderr.
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# util first: it makes Ctrl-C during the imports below one line, not a traceback
from util import ROOT, UserError, median_ms, run_cli, say

import numpy as np

from get_dataset import id_field, load_dataset, tower_inputs
from model_config import MODELS, parse_args
from runtime import batches, epoch_order, init_mindspore, train_step, trained_run


def machine():
    import os
    import platform
    import mindspore as ms
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    vector = next((name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2")) if flag in flags), "other")
    return {"cpu": cpu, "vector": vector, "cores": os.cpu_count(), "python": platform.python_version(),
            "mindspore": ms.__version__, "numpy": np.__version__}


def timed(fn, steps):
    start = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - start) / steps


def endless_batches(arrays, names, cfg, numpy=False):
    """Training batches as train.py feeds them, epoch after epoch (as numpy arrays for the PyTorch peer)."""
    n, epoch = len(arrays["label"]), 0
    while True:
        yield from batches(arrays, names + ["label"], cfg.batch_size, epoch_order(cfg.seed, epoch, n), numpy=numpy)
        epoch += 1


def compiled_loop(step_fn, net, feed):
    """run(k): k steps of `step_fn` on the next batches of `feed`, waiting for the last one."""
    def run(k):
        net.set_train(True)
        for _ in range(k):
            loss = step_fn(*next(feed))
        loss.asnumpy()
    return run


def functional_step(model, cfg):
    """The functional alternative to TrainOneStepCell: value_and_grad + optimizer under ms.jit (GRAPH_MODE)."""
    import mindspore as ms
    from mindspore import nn
    from model import LossCell
    optimizer = nn.Adam(model.trainable_params(), learning_rate=cfg.lr)
    grad = ms.value_and_grad(LossCell(model), None, optimizer.parameters)

    @ms.jit
    def step(*batch):
        loss, grads = grad(*batch)
        optimizer(grads)
        return loss
    return step


class RowDataset:
    """One float row per sample from pandas .iloc, as the published util.MyDataset."""

    def __init__(self, frame, labels):
        self.frame, self.labels = frame, labels

    def __getitem__(self, i):
        import mindspore as ms
        return self.frame.iloc[i], ms.Tensor(self.labels.iloc[i], dtype=ms.float32)

    def __len__(self):
        return len(self.labels)


class PublishedLoop:
    """A faithful re-creation of the published MindSpore loop: PyNative, a per-row GeneratorDataset
    (RowDataset; columns sliced and cast in the model call), sklearn's AUC of every batch."""

    def __init__(self, meta, arrays, cfg):
        import pandas as pd
        self.meta, self.cfg, self.names = meta, cfg, meta["inputs"]
        self.n = n = len(arrays["label"])
        self.widths = [arrays[k].reshape(n, -1).shape[1] for k in self.names]
        self.int_inputs = {k for k in self.names if arrays[k].dtype.kind == "i"}
        self.rows = RowDataset(pd.DataFrame(np.concatenate([arrays[k].reshape(n, -1).astype(np.float64)
                                                            for k in self.names], 1)), pd.Series(arrays["label"]))
        self.model = self.iterator = self.first = None

    def forward(self, rows, y):
        import mindspore as ms
        from mindspore import ops
        cols, start = [], 0
        for k, w in zip(self.names, self.widths):
            cols.append(ms.Tensor(rows[:, start:start + w], dtype=ms.int32 if k in self.int_inputs else ms.float32))
            start += w
        logits, extras = self.model.forward(*cols)
        loss = ops.binary_cross_entropy_with_logits(logits, y, ops.ones_like(y), ops.ones_like(y))
        if self.model.has_aux:
            loss = loss + self.model.aux_loss(extras, y)
        return loss, logits

    def start(self):
        """A fresh pipeline and its first batch, outside the timing. The pipeline prefetches up to 16 batches
        in background threads: it is stopped after each repeat, or it would run during the other loops'
        timing (slowing them down) and hand the next repeat a full queue (speeding it up)."""
        import mindspore.dataset as ds
        dataset = ds.GeneratorDataset(self.rows, column_names=["data", "label"], shuffle=True)
        dataset = dataset.batch(self.cfg.batch_size)
        self.iterator = dataset.create_dict_iterator(num_epochs=1)
        self.first = next(self.iterator)

    def __call__(self, k):
        import mindspore as ms
        from mindspore import nn
        from sklearn.metrics import roc_auc_score
        from model import build_model
        ms.set_context(mode=ms.PYNATIVE_MODE)
        if self.model is None:  # built in PyNative mode, as the published train.py does
            self.model = build_model(self.meta, self.cfg)
            self.optimizer = nn.Adam(self.model.trainable_params(), learning_rate=self.cfg.lr)
            self.grad = ms.value_and_grad(self.forward, None, self.optimizer.parameters, has_aux=True)
        self.model.set_train(True)
        for step in range(k):
            batch = self.first if step == 0 else next(self.iterator)
            (loss, logits), grads = self.grad(batch["data"], batch["label"])
            self.optimizer(grads)
            roc_auc_score(batch["label"].asnumpy().astype(int), logits.asnumpy())
        self.iterator.stop()
        ms.set_context(mode=ms.GRAPH_MODE)


def bench_train(cfg, repeats, steps, peer=None, peer_masks="kernel", peer_genres="gather"):
    """Median seconds per step of (a) train.py's compiled step (TrainOneStepCell) fed whole numpy batches,
    (c) the same with a functional value_and_grad + optimizer under ms.jit, (b) the published loop
    (PublishedLoop) and, with peer="torch", (d) the same model in eager PyTorch (torch_peer) on the same
    batches. Same model, same data, alternating repeats in one process."""
    from model import build_model
    init_mindspore(cfg)
    data = load_dataset(cfg)
    arrays, meta = data.arrays("train"), data.meta
    model, fn_model = build_model(meta, cfg), build_model(meta, cfg)
    loops = {"ours": compiled_loop(train_step(model, cfg), model, endless_batches(arrays, meta["inputs"], cfg)),
             "value_and_grad_jit": compiled_loop(functional_step(fn_model, cfg), fn_model,
                                                 endless_batches(arrays, meta["inputs"], cfg))}
    if peer == "torch":
        loops["torch"] = eager_loop(torch_peer(meta, cfg, peer_masks, peer_genres),
                                    endless_batches(arrays, meta["inputs"], cfg, numpy=True))
    published = PublishedLoop(meta, arrays, cfg)
    say("warming up (compilation, first batches)")
    for run in loops.values():
        run(3)
    published.start()
    published(2)
    times = {name: [] for name in list(loops) + ["published"]}
    for r in range(repeats):
        for name, run in loops.items():
            times[name].append(timed(run, steps))
        published.start()
        times["published"].append(timed(published, max(5, steps // 5)))
        say(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{name} {t[-1] * 1000:.0f} ms/step" for name, t in times.items()))
    bs, ours_med, pub_med = cfg.batch_size, statistics.median(times["ours"]), statistics.median(times["published"])
    ratios = [p / o for p, o in zip(times["published"], times["ours"])]
    result = {"what": "train", "data": f"{meta['dataset']}/{meta['protocol']} ({published.n:,} training rows)",
              "model": cfg.model, "batch_size": bs, "dropout_masks": cfg.dropout_masks, "repeats": repeats,
              "steps_per_repeat": steps, "ours_ms_per_step": round(ours_med * 1000, 1), "ours_samples_per_s": round(bs / ours_med),
              "value_and_grad_jit_ms_per_step": round(statistics.median(times["value_and_grad_jit"]) * 1000, 1),
              "published_ms_per_step": round(pub_med * 1000, 1), "published_samples_per_s": round(bs / pub_med),
              "speedup_median": round(statistics.median(ratios), 1), "speedups": [round(x, 1) for x in ratios]}
    if peer == "torch":
        import torch
        peer_ratios = [t / o for t, o in zip(times["torch"], times["ours"])]  # > 1: ours is faster
        result.update({"torch_ms_per_step": round(statistics.median(times["torch"]) * 1000, 1),
                       "torch_samples_per_s": round(bs / statistics.median(times["torch"])),
                       "ratio_vs_torch_median": round(statistics.median(peer_ratios), 3),
                       "ratios_vs_torch": [round(x, 3) for x in peer_ratios],
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_dropout_masks": peer_masks,
                       "torch_genres": peer_genres})
    floor = machine_floor()  # the arithmetic floor of a step: its FLOPs at this machine's fp32 GEMM peak
    flops = step_flops(model, cfg)
    result.update({"gflop_per_step": round(flops / 1e9, 2), "gemm_peak_gflop_s": floor["gemm_gflop_s"],
                   "flop_floor_ms_per_step": round(flops / floor["gemm_gflop_s"] / 1e6, 1), "options": cfg.changed(),
                   "machine": machine()})
    return result


# ---------------------------------------------------------------- the PyTorch peer (train --peer torch)

def torch_peer(meta, cfg, masks="kernel", genres="gather"):
    """The same IntTower-family model in eager PyTorch (an optional dependency of this benchmark only):
    the same fields (a multi-valued field is the masked mean of its ids), Light-SE, MLP with BatchNorm,
    ReLU and Dropout (no bias before BatchNorm, `linear_output` honoured), FE-Block MaxSim (mean over the
    user heads) or the dot product, CIR on the first `cir_anchors` rows, BCE, Adam. `masks`: the peer's
    dropout, "kernel" (nn.Dropout: the issue's peer) or "pool" (module.Dropout's pool of masks read in order:
    index_select and a product), whatever ours uses. `genres`: a multi-valued field's mean as its gathered ids'
    embeddings, masked and summed ("gather": the issue's peer) or, in training, as ours computes it
    (model.FeatureEmbedding.masked_mean: a (B, V) matrix of row weights times the table; "product").
    Returns step(*numpy_batch) -> loss."""
    import os
    cfg = cfg.for_model()
    if MODELS[cfg.model].cls != "IntTower" or cfg.se not in ("lightse", "none") or cfg.interaction not in ("fe", "dot"):
        raise UserError(f"--peer torch builds IntTower and two_tower (Light-SE or none, FE-Block or dot), "
                        f"not {cfg.model} with se={cfg.se}, interaction={cfg.interaction}")
    try:
        import torch
    except ImportError:
        raise UserError("--peer torch needs PyTorch, an optional dependency of this benchmark only: "
                        "pip install torch==2.13.0 (docs/performance.md)") from None
    from torch import nn as tnn
    from model import SMALL_VOCAB
    from module import mask_pool
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count())

    class PoolDropout(tnn.Module):  # module.Dropout in PyTorch
        def __init__(self, p, channels, pool_rows=8192):
            super().__init__()
            self.register_buffer("pool", torch.from_numpy(mask_pool(p, channels, pool_rows)))
            self.offset = 0

        def forward(self, x):
            if not self.training:
                return x
            rows = (torch.arange(x.shape[0]) + self.offset) % self.pool.shape[0]
            self.offset += x.shape[0]
            return x * self.pool.index_select(0, rows)

    def dropout(size):
        return PoolDropout(cfg.dropout, size) if masks == "pool" else tnn.Dropout(cfg.dropout)

    class Tower(tnn.Module):
        def __init__(self, spec):
            super().__init__()
            dim = cfg.embed_dim
            self.sparse = tnn.ModuleList(tnn.Embedding(f["vocab_size"], dim) for f in spec["sparse"])
            self.multi = tnn.ModuleList(tnn.Embedding(f["vocab_size"], dim) for f in spec["multi"])
            fields = len(spec["sparse"]) + len(spec["multi"])
            self.se = tnn.Linear(fields, fields) if cfg.se == "lightse" else None
            self.n_dense, width, layers = len(spec["dense"]), fields * dim + len(spec["dense"]), []
            for k, size in enumerate(cfg.mlp):
                hidden = not (cfg.linear_output and k == len(cfg.mlp) - 1)
                norm = cfg.batch_norm and (hidden or cfg.output_batch_norm)
                block = [tnn.Linear(width, size, bias=not norm)]
                block += [tnn.BatchNorm1d(size, momentum=0.1)] if norm else []
                if hidden:
                    block += [tnn.ReLU()] + ([dropout(size)] if cfg.dropout > 0 else [])
                layers.append(tnn.Sequential(*block))
                width = size
            self.mlp = tnn.ModuleList(layers)
            self.widths = (fields * dim + self.n_dense,) + tuple(cfg.mlp)

        def forward(self, inputs):
            fields = [table(inputs[0][:, k]) for k, table in enumerate(self.sparse)] if len(self.sparse) else []
            first = int(len(self.sparse) > 0)
            for k, table in enumerate(self.multi):
                ids, mask = inputs[first + 2 * k], inputs[first + 2 * k + 1]
                count = mask.sum(1, keepdim=True).clamp(min=1.0)
                if genres == "product" and self.training and table.num_embeddings <= SMALL_VOCAB:
                    rows = torch.zeros(len(ids), table.num_embeddings).scatter_add_(1, ids, mask / count)
                    fields.append(rows @ table.weight)
                else:
                    fields.append((table(ids) * mask.unsqueeze(-1)).sum(1) / count)
            e = torch.stack(fields, 1)
            if self.se is not None:
                e = e + e * torch.softmax(self.se(e.mean(-1)), -1).unsqueeze(-1)
            x = e.flatten(1)
            x = torch.cat((x, inputs[-1]), 1) if self.n_dense else x
            outputs = [x]
            for layer in self.mlp:
                outputs.append(layer(outputs[-1]))
            return outputs

    from model import fe_user_layers
    n_user, user_layers = sum(name.startswith("user_") for name in meta["inputs"]), fe_user_layers(cfg)
    heads, p, item_id = cfg.heads, cfg.head_dim, id_field(meta["towers"], "item")

    class Peer(tnn.Module):
        def __init__(self):
            super().__init__()
            self.user, self.item = Tower(meta["towers"]["user"]), Tower(meta["towers"]["item"])
            if cfg.interaction == "fe":
                self.user_proj = tnn.ModuleList(tnn.Linear(self.user.widths[i], heads * p) for i in user_layers)
                self.item_proj = tnn.Linear(cfg.mlp[-1], heads * p)
            self.bias = tnn.Parameter(torch.zeros(()))

        def forward(self, inputs, labels):
            user, item = self.user(inputs[:n_user]), self.item(inputs[n_user:])
            if cfg.interaction == "fe":
                u = torch.cat([proj(user[i]).view(-1, heads, p) for proj, i in zip(self.user_proj, user_layers)], 1)
                u = u * (1.0 / u.shape[1]) if cfg.fe_mean else u
                v = self.item_proj(item[-1]).view(-1, heads, p)
                logits = torch.bmm(u, v.transpose(1, 2)).amax(-1).sum(-1) + self.bias
            else:
                logits = (user[-1] * item[-1]).sum(-1) + self.bias
            loss = tnn.functional.binary_cross_entropy_with_logits(logits, labels)
            if cfg.cir_weight > 0:
                k = cfg.cir_anchors or len(labels)
                un = tnn.functional.normalize(user[-1][:k], dim=-1) / cfg.cir_tau
                vn = tnn.functional.normalize(item[-1], dim=-1)
                logits = un @ vn.T
                if cfg.cir_mask_same_item:  # the anchor's own item on other rows is not a negative
                    ids = inputs[n_user][:, item_id]
                    logits = logits.masked_fill((ids[:k, None] == ids[None, :]) & ~torch.eye(k, len(ids), dtype=bool), -1e9)
                nll = torch.logsumexp(logits, 1) - (un * vn[:k]).sum(-1)
                loss = loss + cfg.cir_weight * (nll * labels[:k]).sum() / labels[:k].sum().clamp(min=1.0)
            return loss

    model = Peer()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()

    def step(*batch):
        inputs = [torch.from_numpy(a).long() if a.dtype.kind == "i" else torch.from_numpy(a) for a in batch[:-1]]
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs, torch.from_numpy(batch[-1]))
        loss.backward()
        optimizer.step()
        return loss
    return step



def eager_loop(step, feed):
    def run(k):
        for _ in range(k):
            loss = step(*next(feed))
        float(loss)
    return run


def bench_data(cfg, repeats):
    """Preprocessing time from the raw files, and loading a split as npz vs as MindRecord."""
    import shutil
    import tempfile
    import get_dataset as gd
    name, path = gd.resolve_source(cfg)
    cfg = cfg.replace(protocol=gd.resolve_protocol(cfg, name, path))
    build_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        raw = gd.read_movielens(name, path)
        gd.build(raw, cfg)
        build_s.append(time.perf_counter() - start)
        say(f"preprocess {len(raw.ratings):,} ratings: {build_s[-1]:.2f} s")
    data = gd.load_dataset(cfg, quiet=True)
    arrays = data.arrays("train")
    tmp = Path(tempfile.mkdtemp())
    try:
        from mindspore.mindrecord import FileWriter
        import mindspore.dataset as ds
        n = len(arrays["label"])
        writer = FileWriter(str(tmp / "train.mindrecord"), shard_num=1, overwrite=True)
        writer.add_schema({k: {"type": "int32" if v.dtype.kind == "i" else "float32", "shape": [-1]}
                           if v.ndim > 1 else {"type": "int32" if v.dtype.kind == "i" else "float32"}
                           for k, v in arrays.items() if k not in ("user_key", "item_key", "timestamp")}, "rows")
        rows = [{k: (v[i].astype(np.int32) if v.dtype.kind == "i" else v[i].astype(np.float32))
                 for k, v in arrays.items() if k not in ("user_key", "item_key", "timestamp")} for i in range(n)]
        writer.write_raw_data(rows)
        writer.commit()
        npz_s, mr_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            data.arrays("train")
            npz_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            dataset = ds.MindDataset(str(tmp / "train.mindrecord"), shuffle=False)
            loaded = {k: [] for k in rows[0]}
            for row in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
                for k in loaded:
                    loaded[k].append(row[k])
            {k: np.stack(v) for k, v in loaded.items()}
            mr_s.append(time.perf_counter() - start)
            say(f"load the training split: npz {npz_s[-1]:.3f} s, MindRecord {mr_s[-1]:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"what": "data", "data": f"{name} ({path})", "ratings": int(len(raw.ratings)),
            "preprocess_seconds_median": round(statistics.median(build_s), 2),
            "train_rows": int(len(arrays["label"])), "load_npz_seconds_median": round(statistics.median(npz_s), 3),
            "load_mindrecord_seconds_median": round(statistics.median(mr_s), 3), "repeats": repeats,
            "machine": machine()}


def step_flops(model, cfg):
    """Multiply-adds x 2 of one training step (forward + backward ~ 3x forward) in the dense layers,
    the FE-Block MaxSim and the CIR similarities: the arithmetic floor of the step."""
    from mindspore import nn
    bs = cfg.batch_size
    forward = sum(2 * bs * c.in_channels * c.out_channels for _, c in model.cells_and_names() if isinstance(c, nn.Dense))
    if getattr(model, "scoring", None) == "maxsim":
        forward += 2 * bs * len(model.fe.user_layers) * cfg.heads * cfg.heads * cfg.head_dim
    if getattr(model, "has_aux", False) and hasattr(model, "cir"):
        anchors = min(cfg.cir_anchors or bs, bs)
        forward += 2 * anchors * bs * cfg.mlp[-1]
    return 3 * forward


def kernel_probes(rows=2048, width=300, repeats=50):
    """What the CPU offers and what MindSpore's CPU kernels make of it, on one layer's shapes: GFLOP/s of a
    (rows, width) @ (width, width) product per dtype ("no kernel" where MindSpore has none), and ms of an
    element-wise multiply by a (width,) vector (broadcast) against one by an equal-shaped array."""
    import mindspore as ms
    from mindspore import nn, ops
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])

    class Chain(nn.Cell):  # the op 20 times in one graph: the launch of the graph is not what is timed
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def construct(self, a, b):
            for _ in range(20):
                a = self.fn(a, b)
            return a

    def ms_per_call(fn, a, b):
        cell = Chain(fn)
        cell(a, b).asnumpy()
        return median_ms(lambda: cell(a, b).asnumpy(), repeats) / 20
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(rows, width)).astype(np.float32))
    w = ms.Tensor(rng.normal(size=(width, width)).astype(np.float32))
    matmul = {}
    for name, dtype in (("float32", ms.float32), ("float16", ms.float16), ("bfloat16", ms.bfloat16)):
        try:
            matmul[name] = round(2 * rows * width * width / ms_per_call(ops.matmul, x.astype(dtype), w.astype(dtype)) / 1e6, 1)
        except (RuntimeError, TypeError, ValueError) as e:
            reason = next((line.strip() for line in str(e).splitlines() if line.strip(" -")), "")
            matmul[name] = f"no kernel ({reason[:80]})"
    vector, same = ms.Tensor(rng.normal(size=width).astype(np.float32)), ms.Tensor(rng.normal(size=(rows, width)).astype(np.float32))
    return {"cpu_flags": {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
            f"matmul_{rows}x{width}x{width}_gflop_s": matmul,
            "mul_by_vector_ms": round(ms_per_call(ops.mul, x, vector), 3),
            "mul_equal_shapes_ms": round(ms_per_call(ops.mul, x, same), 3)}


MATRIX_PRODUCTS = {"MatMul", "BatchMatMul", "aten::mm", "aten::addmm", "aten::bmm"}  # both frameworks' GEMMs


def split_ms(ops_ms):
    """(matrix products, everything else) of {operator type: ms per step}."""
    gemm = sum(v for k, v in ops_ms.items() if k in MATRIX_PRODUCTS)
    return round(gemm, 1), round(sum(ops_ms.values()) - gemm, 1)


def top_ms(ops_ms, k=15):
    """The k costliest operators of {operator type: ms per step}, costliest first."""
    return {name: round(v, 2) for name, v in sorted(ops_ms.items(), key=lambda kv: -kv[1])[:k]}


def profile_torch_peer(meta, arrays, cfg, steps, masks="kernel"):
    """The PyTorch peer's steps under torch.profiler on the same training data: ms per step of each operator
    (self CPU time, so nested operators are not counted twice)."""
    from torch.profiler import ProfilerActivity, profile
    step = torch_peer(meta, cfg, masks)
    feed = endless_batches(arrays, meta["inputs"], cfg, numpy=True)
    for _ in range(3):
        step(*next(feed))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(*next(feed))
        float(loss)
        wall = (time.perf_counter() - start) / steps * 1000
    ops_ms = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    return wall, ops_ms


def bench_profile(cfg, steps, peer=None, peer_masks="kernel"):
    """Run `steps` train steps under MindSpore's profiler; milliseconds per step of each operator type.
    With peer="torch", the PyTorch peer's steps under torch.profiler too, and both split into matrix
    products and the rest: where one framework's step is faster than the other's."""
    import csv
    import shutil
    import tempfile
    from model import build_model
    ms = init_mindspore(cfg)
    data = load_dataset(cfg)
    model = build_model(data.meta, cfg)
    step = train_step(model, cfg)
    step.set_train(True)
    feed = endless_batches(data.arrays("train"), data.meta["inputs"], cfg)
    step(*next(feed)).asnumpy()  # compile outside the profile
    out = Path(tempfile.mkdtemp())
    try:
        profiler = ms.Profiler(output_path=str(out))
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(*next(feed))
        loss.asnumpy()
        wall = (time.perf_counter() - start) / steps * 1000
        profiler.stop()
        profiler.analyse()
        table = next(out.rglob("cpu_op_type_info_0.csv"))
        rows = list(csv.DictReader(open(table)))
        ops_ms = {row["op_type"]: float(row["total_compute_time"]) / steps for row in rows}
        launches = sum(int(row["execution_frequency(per-step)"]) for row in rows)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    flops = step_flops(model, cfg)
    gemm, rest = split_ms(ops_ms)
    result = {"what": "profile", "model": cfg.model, "batch_size": cfg.batch_size, "dropout_masks": cfg.dropout_masks,
              "steps": steps,
              "wall_ms_per_step_profiled": round(wall, 1), "kernel_ms_per_step": round(sum(ops_ms.values()), 1),
              "kernels_per_step": launches,
              "outside_kernels_ms_per_step": round(wall - sum(ops_ms.values()), 1),
              "matrix_products_ms_per_step": gemm, "other_kernels_ms_per_step": rest,
              "top_operators_ms_per_step": top_ms(ops_ms),
              "gflop_per_step": round(flops / 1e9, 2),
              "flop_floor_ms_per_step": round(flops / machine_floor()["gemm_gflop_s"] / 1e6, 1),
              "matmul_gflops_per_s": round(flops / 1e9 / (gemm / 1000), 1) if gemm else None}
    if peer == "torch":
        import torch
        peer_wall, peer_ms = profile_torch_peer(data.meta, data.arrays("train"), cfg, steps, peer_masks)
        peer_gemm, peer_rest = split_ms(peer_ms)
        result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(), "dropout_masks": peer_masks,
                           "wall_ms_per_step_profiled": round(peer_wall, 1),
                           "operators_ms_per_step": round(sum(peer_ms.values()), 1),
                           "matrix_products_ms_per_step": peer_gemm, "other_operators_ms_per_step": peer_rest,
                           "top_operators_ms_per_step": top_ms(peer_ms)}
    result.update({"kernel_probes": kernel_probes(), "options": cfg.changed(), "machine": machine()})
    return result


def bench_serve(cfg, repeats, sizes=(1_000, 10_000, 100_000)):
    """Median latency of scoring N candidates for one user, side by side in one process:
    (a) the user tower (one call) + MaxSim over the precomputed item index (float32, contiguous),
    (b) the plain two-tower dot product over N vectors of the same tower width (the decoupled lower bound),
    (c) the exported full model on N (user, item) pairs (what serving the published export implies).
    The index is the catalogue repeated to N rows: timing depends on shapes, not on values."""
    import mindspore as ms
    from mindspore import nn
    from scorer import Scorer, maxsim, maxsim_buffers, tiled_index
    if not cfg.run_dir:
        raise UserError("benchmark.py serve needs --run_dir RUN (a trained IntTower run)")
    export = Path(cfg.run_dir) / "export"
    if not (export / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "export.py"), "--run_dir", cfg.run_dir], cwd=ROOT, check=True,
                       stdout=sys.stderr)
    _, _, run_cfg, meta = trained_run(cfg, {"run_dir"})
    catalog = load_dataset(run_cfg, quiet=True).arrays("items")
    scorer = Scorer(export)
    full = nn.GraphCell(ms.load(str(export / "model.mindir")))
    items = scorer.index[:-1]
    user_id = int(scorer.users["key"][0])
    user, _ = scorer.user_vector(user_id)
    user_inputs, _ = scorer.user_inputs(user_id)
    dot_dim = run_cfg.mlp[-1]

    rows = []
    for n in sizes:
        index = tiled_index(scorer, n)  # (H, n, p) float32, contiguous
        index16 = index.astype(np.float16)
        buffers = maxsim_buffers(user, index)
        dot_index = np.random.default_rng(0).normal(size=(n, dot_dim)).astype(np.float32)
        dot_user = np.random.default_rng(1).normal(size=dot_dim).astype(np.float32)
        rows_idx = np.resize(np.arange(len(items)), n)
        pair_inputs = [ms.Tensor(np.repeat(user_inputs[k], n, 0)) for k in tower_inputs(meta["towers"], "user")] + \
                      [ms.Tensor(catalog[k][rows_idx]) for k in tower_inputs(meta["towers"], "item")]
        r = max(5, repeats * 10 if n <= 10_000 else repeats * 2)
        row = {"candidates": n,
               "maxsim_ms": median_ms(lambda: maxsim(user, index, buffers), r),
               "maxsim_fp16_index_ms": median_ms(lambda: maxsim(user, index16.astype(np.float32), buffers), r),
               "user_tower_ms": median_ms(lambda: scorer.user_vector(user_id), r),
               "user_tower_plus_maxsim_ms": median_ms(lambda: maxsim(scorer.user_vector(user_id)[0], index, buffers), r),
               "two_tower_dot_ms": median_ms(lambda: dot_index @ dot_user, r),
               "full_model_ms": median_ms(lambda: full(*pair_inputs).asnumpy(), max(3, repeats))}
        row["maxsim_over_dot"] = round(row["maxsim_ms"] / row["two_tower_dot_ms"], 1)
        row["full_over_maxsim"] = round(row["full_model_ms"] / row["maxsim_ms"], 1)
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        say(json.dumps(rows[-1]))
    return {"what": "serve", "run_dir": cfg.run_dir, "user_shape": list(user.shape), "item_shape": list(items.shape[1:]),
            "bytes_per_item_float32": int(items[0].nbytes), "bytes_per_item_float16": int(items[0].nbytes // 2),
            "bytes_per_item_two_tower": dot_dim * 4, "rows": rows, "machine": machine()}


def machine_floor():
    """This machine's fp32 GEMM peak (1024^3, the BLAS's threads) and read bandwidth (sum of 256 MB split among
    every core's thread, as the kernel's threads read; NumPy's reductions release the GIL), and the bandwidth of
    one thread."""
    from scorer import cores, thread_pool
    a = np.random.default_rng(0).normal(size=(1024, 1024)).astype(np.float32)
    c = np.empty_like(a)
    gflops = 2 * 1024**3 / median_ms(lambda: np.matmul(a, a, out=c), 10) / 1e6
    big = np.ones(1 << 26, np.float32)
    parts = np.array_split(big, cores())

    def read():
        others = [thread_pool().submit(np.sum, part) for part in parts[1:]]
        parts[0].sum()
        return [part.result() for part in others]
    return {"gemm_gflop_s": round(gflops, 1), "read_gb_s": round(big.nbytes / median_ms(read, 7) / 1e6, 1),
            "read_gb_s_one_thread": round(big.nbytes / median_ms(big.sum, 7) / 1e6, 1)}


def floor_ms(floor, flop, nbytes):
    return {"flop_floor_ms": round(flop / floor["gemm_gflop_s"] / 1e6, 3),
            "byte_floor_ms": round(nbytes / floor["read_gb_s"] / 1e6, 3)}


def test_split_vectors(export, run_cfg, meta):
    """User (B, L*H, p) and item (B, H, p) vectors of every test row, through the exported tower graphs."""
    import mindspore as ms
    from mindspore import nn
    test = load_dataset(run_cfg, quiet=True).arrays("test")
    out = {}
    for tower in ("user", "item"):
        cell = nn.GraphCell(ms.load(str(export / f"{tower}_tower.mindir")))
        names = tower_inputs(meta["towers"], tower)
        out[tower] = np.concatenate([cell(*[ms.Tensor(test[k][s:s + 8192]) for k in names]).asnumpy()
                                     for s in range(0, len(test["label"]), 8192)])
    return out["user"].reshape(len(test["label"]), -1, out["item"].shape[-1]), out["item"], test["label"]


def pair_maxsim(users, items):
    return np.einsum("blp,bkp->blk", users, items, optimize=True).max(-1).sum(-1)


def bench_serving(cfg, repeats, last_run=None, sizes=(10_000, 100_000), catalogue=1_000_000):
    """Serving figures of issue 17 in one process (docs/serving.md): machine floors; the user tower through
    ONNX Runtime and nn.GraphCell; request end to end (user inputs -> top 100) for the full model and the
    last-layer variant; compressed indexes (speed, score error, top-100 overlap, test AUC); batched scoring;
    two-stage retrieval over a generated catalogue of `catalogue` items of the real shape (recall@100)."""
    from scorer import Scorer
    if not cfg.run_dir:
        raise UserError("benchmark.py serve needs --run_dir RUN (a trained IntTower run)")
    runs = {"full": Path(cfg.run_dir)} | ({"last_layer": Path(last_run)} if last_run else {})
    for run in runs.values():
        if not (run / "export" / "manifest.json").exists():
            subprocess.run([sys.executable, str(ROOT / "export.py"), "--run_dir", str(run)], cwd=ROOT, check=True,
                           stdout=sys.stderr)
    floor = machine_floor()
    say(json.dumps(floor))
    r = max(5, repeats * 20)
    scorers = {name: Scorer(run / "export") for name, run in runs.items()}
    result = {"what": "serve", "runs": {k: str(v) for k, v in runs.items()}, "floor": floor,
              "requests": [serving_requests(name, scorer, floor, sizes, r) for name, scorer in scorers.items()]}
    scorer = scorers["full"]
    user = scorer.user_vector(int(scorer.users["key"][0]))[0]
    users = scorer.user_vectors([int(u) for u in np.random.default_rng(0).choice(scorer.users["key"], 50)])
    result["compressed"] = serving_compressed(cfg, scorer, user, users, sizes, r)
    result["batched_10000"] = serving_batched(scorer, user, users, r)
    result["catalogue"] = serving_catalogue(scorer, user, users, floor, catalogue)
    result["machine"] = machine()
    return result


def serving_requests(name, scorer, floor, sizes, r):
    """One request end to end (user features in -> top 100 out) and its parts, against the floors: MaxSim as the
    scorer runs it (MaxSimIndex: the C++ kernel where it builds; on one thread, as the service does, and on
    every core, `_cores` keys) and in NumPy (maxsim, the reference, on BLAS's threads)."""
    from scorer import MaxSimIndex, best_first, cores, maxsim, maxsim_buffers, tiled_index
    user_id = int(scorer.users["key"][0])
    inputs, _ = scorer.user_inputs(user_id)
    user = scorer.tower(inputs)
    row = {"model": name, "user_shape": list(user.shape),
           "maxsim": "numpy" if scorer.kernel is None else "kernel",
           "user_tower_onnx_ms": median_ms(lambda: scorer.tower(inputs), r) if scorer.onnx_tower else None,
           "user_tower_graphcell_ms": median_ms(lambda: scorer.tower(inputs, "mindir"), r)}
    for n in sizes:
        index = tiled_index(scorer, n)
        buffers = maxsim_buffers(user, index)
        score = MaxSimIndex(index, scorer.kernel).scores

        def request(threads=1):  # user features in -> top 100 out
            return best_first(score(scorer.tower(inputs), threads), 100)
        flop, nbytes = 2 * user.size * index.shape[0] * n, index.nbytes
        row[f"maxsim_{n}_ms"] = median_ms(lambda: score(user), r)
        row[f"maxsim_{n}_cores_ms"] = median_ms(lambda: score(user, cores()), r)
        row[f"maxsim_numpy_{n}_ms"] = median_ms(lambda: maxsim(user, index, buffers), r)
        row[f"end_to_end_{n}_ms"] = median_ms(request, r)
        row[f"end_to_end_{n}_cores_ms"] = median_ms(lambda: request(cores()), r)
        row[f"floor_{n}"] = floor_ms(floor, flop, nbytes)
    row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
    say(json.dumps(row))
    return row


def serving_compressed(cfg, scorer, user, users, sizes, r):
    """Each compressed index against exact float32: speed at each size, top-100 overlap on the real catalogue
    (with and without exact re-scoring of the shortlist), and the test AUC of the run's test pairs."""
    from util import auc
    from scorer import CompressedIndex, best_first, head_major, maxsim, maxsim_buffers, tiled_index
    _, _, run_cfg, meta = trained_run(cfg, {"run_dir"})
    pair_users, pair_items, labels = test_split_vectors(Path(cfg.run_dir) / "export", run_cfg, meta)
    exact_auc = auc(labels, pair_maxsim(pair_users, pair_items))
    catalogue_index = scorer.by_head[:, :-1]
    variants = [{"index": "float32 (exact)", "test_auc": round(exact_auc, 5)}]
    for kind in CompressedIndex.KINDS:
        variant = {"index": kind}
        real = CompressedIndex(catalogue_index, kind)
        truths = [set(best_first(maxsim(u, catalogue_index), 100)) for u in users]
        variant["top100_overlap_no_rescoring"] = round(float(np.mean(
            [len(t & set(best_first(real.scores(u), 100))) / 100 for u, t in zip(users, truths)])), 4)
        variant["top100_overlap_rescored"] = round(float(np.mean(
            [len(t & set(real.top_k(u, 100)[0])) / 100 for u, t in zip(users, truths)])), 4)
        pairs = CompressedIndex(head_major(pair_items), kind).widened().transpose(1, 0, 2)
        variant["test_auc"] = round(auc(labels, pair_maxsim(pair_users, pairs)), 5)
        variant["test_auc_change"] = round(variant["test_auc"] - exact_auc, 6)
        variant["bytes_per_item"] = int(real.nbytes // len(catalogue_index[0]))
        for n in sizes:
            c = CompressedIndex(tiled_index(scorer, n), kind)
            variant[f"scores_{n}_ms"] = round(median_ms(lambda: c.scores(user), max(5, r // 10)), 3)
            variant[f"top100_rescored_{n}_ms"] = round(median_ms(lambda: c.top_k(user, 100), max(5, r // 10)), 3)
        variants.append(variant)
        say(json.dumps(variant))
    for n in sizes:
        index = tiled_index(scorer, n)
        buffers = maxsim_buffers(user, index)
        variants[0][f"scores_{n}_ms"] = round(median_ms(lambda: maxsim(user, index, buffers), r), 3)
    return variants


def serving_batched(scorer, user, users, r, n=10_000):
    """Throughput: B users per call (one GEMM) against B single-user calls, n candidates."""
    from scorer import maxsim, maxsim_batch, maxsim_buffers, tiled_index
    index = tiled_index(scorer, n)
    buffers = maxsim_buffers(user, index)
    batched = []
    for b in (8, 32):
        single = median_ms(lambda: [maxsim(u, index, buffers) for u in users[:b]], max(5, r // 10))
        many = median_ms(lambda: maxsim_batch(users[:b], index), max(5, r // 10))
        batched.append({"users_per_call": b, "one_user_path_users_per_s": round(b / single * 1000, 1),
                        "batched_users_per_s": round(b / many * 1000, 1), "speedup": round(single / many, 2)})
        say(json.dumps(batched[-1]))
    return batched


def serving_catalogue(scorer, user, users, floor, catalogue, noises=(0.3, 1.0), probes=(4, 8, 16, 32, 64, 128)):
    """Two-stage retrieval (IVFRetriever: item cells routed by MaxSim, exact MaxSim on the probed cells) over
    `catalogue` items: the real item vectors resampled with Gaussian noise of `noise` times each coordinate's
    spread (0.3: items near the real ones; 1.0: twice as far apart as the real items spread, a catalogue
    with much weaker cluster structure). recall@100 against exact MaxSim (NumPy) over the whole catalogue, 20
    users. The cells, and exact MaxSim beside NumPy's, are scored as the scorer scores them (the C++ kernel
    where it builds)."""
    from scorer import IVFRetriever, MaxSimIndex, best_first, maxsim
    catalogue_index = scorer.by_head[:, :-1]
    spread = catalogue_index.std(1, keepdims=True)
    heads, _, dim = catalogue_index.shape
    queries = users[:20]
    big = np.empty((heads, catalogue, dim), np.float32)
    retrieval = {"items": catalogue, "exact_floor": floor_ms(floor, 2 * user.size * heads * catalogue, big.nbytes),
                 "noises": []}
    for noise in noises:
        rng = np.random.default_rng(0)
        for s in range(0, catalogue, 100_000):
            e = min(catalogue, s + 100_000)
            big[:, s:e] = catalogue_index[:, rng.integers(0, catalogue_index.shape[1], e - s)] + \
                (noise * spread * rng.standard_normal((heads, e - s, dim))).astype(np.float32)
        started = time.perf_counter()
        truths = [set(best_first(maxsim(u, big), 100)) for u in queries]
        exact_ms = (time.perf_counter() - started) / len(queries) * 1000
        exact = MaxSimIndex(big, scorer.kernel)
        exact_kernel_ms = statistics.median([median_ms(lambda: exact.scores(u), 3) for u in queries[:5]])
        del exact
        started = time.perf_counter()
        ivf = IVFRetriever(big, kernel=scorer.kernel)
        part = {"noise": noise, "exact_maxsim_ms": round(exact_ms, 1),
                "exact_maxsim_kernel_ms": round(exact_kernel_ms, 1),
                "ivf_lists": len(ivf.cells),
                "ivf_build_s": round(time.perf_counter() - started, 1), "rows": []}
        for nprobe in probes:
            found = [set(ivf.top_k(u, 100, nprobe)[0]) for u in queries]
            scored = [sum(ivf.cells[c].n for c in ivf.probed(u, nprobe)) for u in queries]
            ms = statistics.median([median_ms(lambda: ivf.top_k(u, 100, nprobe), 3) for u in queries[:10]])
            part["rows"].append({"nprobe": nprobe, "items_scored": int(np.median(scored)), "ms": round(ms, 2),
                                 "recall_at_100": round(float(np.mean([len(t & f) / 100 for t, f in
                                                                       zip(truths, found)])), 4)})
            say(json.dumps({"noise": noise, **part["rows"][-1]}))
        retrieval["noises"].append(part)
        del ivf
    return retrieval


def main():
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("what", choices=["train", "data", "serve", "profile"])
    own.add_argument("--repeats", type=int, default=5)
    own.add_argument("--steps", type=int, default=30)
    own.add_argument("--last_layer_run", default=None, help="serve: a run trained with --last_layer_only true")
    own.add_argument("--peer", choices=["torch"], default=None,
                     help="train, profile: also time (profile) the same model in eager PyTorch (optional dependency)")
    own.add_argument("--peer_masks", choices=["kernel", "pool"], default="kernel",
                     help="the peer's dropout: nn.Dropout (kernel, the issue's peer) or our pool of masks (pool)")
    own.add_argument("--peer_genres", choices=["gather", "product"], default="gather",
                     help="train: the peer's mean of a multi-valued field: gathered (the issue's peer) or our "
                          "product form (model.FeatureEmbedding.masked_mean)")
    args, rest = own.parse_known_args()
    cfg, _ = parse_args(rest, prog=f"benchmark.py {args.what}", description=__doc__.split("\n\n")[0])
    with contextlib.redirect_stdout(sys.stderr):  # progress lines to stderr: stdout is the JSON result alone
        if args.what == "serve":
            result = bench_serve(cfg, args.repeats)
            result["serving"] = bench_serving(cfg, args.repeats, args.last_layer_run)
        else:
            result = {"train": lambda: bench_train(cfg, args.repeats, args.steps, args.peer, args.peer_masks,
                                                    args.peer_genres),
                      "data": lambda: bench_data(cfg, args.repeats),
                      "profile": lambda: bench_profile(cfg, args.steps, args.peer, args.peer_masks)}[args.what]()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_cli(main)
