"""Train IntTower (or a comparison model) and evaluate its best checkpoint.

    python train.py                                   # ML-1M if present, else the generated sample
    python train.py --data_path ../shared/data/ml-1m/ratings-all-users-no-timestamp.dat.gz --protocol paper
    python train.py --resume runs/RUN                 # continue an interrupted run

A run directory holds config.json, data_meta.json, log.jsonl (one line per epoch), metrics.json,
best.ckpt (the model at its best validation AUC) and last.ckpt (model + optimizer + loop state,
for --resume). The train step is compiled (GRAPH_MODE, nn.TrainOneStepCell) and fed whole batches
sliced from numpy arrays: the fastest setup measured here (README, "Performance").
"""
import hashlib
import json
import math
import os
import resource
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from get_dataset import load_dataset
from model_config import Config, parse_args
from util import UserError, auc, gauc, logloss, read_json, run_cli, say, write_json, atomic_write


def init_mindspore(cfg):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(cfg.device_target)
    except (RuntimeError, ValueError) as e:
        if ms.get_context("device_target") != cfg.device_target:  # not merely a second call on the same device
            raise UserError(f"device {cfg.device_target} is not available here ({str(e).splitlines()[0]})") from None
    ms.set_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    return ms


# ---------------------------------------------------------------- data feeding

def batches(arrays, names, batch_size, order=None, pad=False):
    """Yield tuples of Tensors, one whole batch at a time, in `order` (default: as stored).

    Training drops the last incomplete batch (one compiled shape; a new order every epoch uses all
    rows over time); prediction pads it instead, and the caller drops the padding."""
    import mindspore as ms
    n = len(arrays[names[0]])
    order = np.arange(n) if order is None else order
    stop = n if pad else n - n % batch_size
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if pad and len(idx) < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1] if len(idx) else 0)])
        yield tuple(ms.Tensor(arrays[name][idx]) for name in names)


def epoch_order(seed, epoch, n):
    """The data order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def predict(model, arrays, names, batch_size):
    """Click probabilities for every row (model in inference mode)."""
    n = len(arrays[names[0]])
    if n == 0:
        return np.zeros(0, np.float32)
    model.set_train(False)
    batch_size = min(batch_size, max(n, 1))
    logits = np.concatenate([model(*b).asnumpy() for b in batches(arrays, names, batch_size, pad=True)])[:n]
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def evaluate(model, arrays, names, batch_size, with_gauc=False):
    probs = predict(model, arrays, names, batch_size)
    labels = arrays["label"]
    result = {"auc": auc(labels, probs), "logloss": logloss(labels, probs) if len(labels) else float("nan"),
              "rows": int(len(labels)), "positive_rate": float(labels.mean()) if len(labels) else float("nan")}
    if with_gauc:
        result["gauc"] = gauc(arrays["user_key"], labels, probs)
    return result


# ---------------------------------------------------------------- checkpoints

def params_md5(cell):
    """A checksum of every parameter (by name): equal on all ranks of a data-parallel job."""
    digest = hashlib.md5()
    for name, p in sorted(cell.parameters_and_names(), key=lambda x: x[0]):
        digest.update(name.encode())
        digest.update(p.asnumpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(cell, path, state=None):
    """Write a checkpoint atomically (MindSpore's save deletes the old file before writing)."""
    import mindspore as ms
    params = [{"name": name, "data": p} for name, p in cell.parameters_and_names()]
    extra = {"train_state": json.dumps(state)} if state is not None else None
    atomic_write(path, lambda tmp: ms.save_checkpoint(params, tmp, append_dict=extra, format="ckpt"))


def load_checkpoint(cell, path):
    """Load `path` into `cell`, refusing missing, unexpected or mis-shaped parameters; returns the
    train state stored with it (or None)."""
    import mindspore as ms
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        stored = ms.load_checkpoint(str(path), crc_check=False)
    except (ValueError, RuntimeError, TypeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable MindSpore checkpoint (truncated or another file?): "
                        f"{reason}") from None
    state = stored.pop("train_state", None)
    own = dict(cell.parameters_and_names())
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model ({len(missing)} parameters missing, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): was it saved "
                        f"with another --model or configuration?")
    for name, param in own.items():
        value = stored[name]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{path}: parameter {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(param.shape)}: vocabulary sizes or layer sizes differ from this data/config")
        param.set_data(value if value.dtype == param.dtype else value.astype(param.dtype))
    return json.loads(state) if isinstance(state, str) else None


# ---------------------------------------------------------------- the run

class World:
    """This process's place in a data-parallel job: rank 0 of 1, or one rank of an msrun launch.

    Every rank trains on its own shard (rows rank::size) with the per-rank --batch_size; the gradient
    all-reduce (inserted by TrainOneStepCell under DATA_PARALLEL, gradients_mean=True) keeps the
    weights identical. At each epoch end the BatchNorm moving statistics are averaged too, so every
    rank holds the same model, evaluates the same validation AUC and takes the same decisions; only
    rank 0 writes checkpoints and metrics."""
    size, rank, suffix, is_scheduler = 1, 0, "", False

    @classmethod
    def setup(cls, cfg):
        world = cls()
        if not (cfg.distribute or os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")):
            return world
        import mindspore as ms
        from mindspore import communication, nn, ops
        try:
            communication.init()  # in msrun's scheduler process this runs the whole job
        except RuntimeError as e:
            what = "the distributed job failed" if os.environ.get("MS_ROLE") == "MS_SCHED" else \
                "distributed initialisation failed (launch with msrun, see README)"
            raise UserError(f"{what}: {str(e).strip().splitlines()[0]}") from None
        if os.environ.get("MS_ROLE") == "MS_SCHED":
            world.is_scheduler = True
            return world
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        world.size, world.rank = communication.get_group_size(), communication.get_rank()
        world.suffix = f".rank{world.rank}"

        class AllReduce(nn.Cell):
            def __init__(self):
                super().__init__()
                self.sum = ops.AllReduce()

            def construct(self, x):
                return self.sum(x)

        world._all_reduce = AllReduce()
        return world

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, arrays):
        return arrays if self.size == 1 else {k: v[self.rank::self.size] for k, v in arrays.items()}

    def sum(self, values):
        """Element-wise sum of a float32 vector over the ranks."""
        import mindspore as ms
        values = np.asarray(values, np.float32)
        return values if self.size == 1 else self._all_reduce(ms.Tensor(values)).asnumpy()

    def broadcast_path(self, path):
        """Rank 0's run directory on every rank (its name is sent as bytes)."""
        if self.size == 1:
            return path
        text = np.zeros(512, np.float32)
        if self.is_main:
            raw = str(path).encode()[:512]
            text[:len(raw)] = np.frombuffer(raw, np.uint8)
        data = self.sum(text).astype(np.uint8)
        return Path(bytes(data[data > 0]).decode())

    def sync_statistics(self, model):
        """Average the non-trainable parameters (BatchNorm moving statistics) over the ranks."""
        if self.size == 1:
            return
        import mindspore as ms
        stats = [p for p in model.get_parameters() if not p.requires_grad]
        if stats:
            flat = self.sum(np.concatenate([p.asnumpy().ravel() for p in stats])) / self.size
            start = 0
            for p in stats:
                p.set_data(ms.Tensor(flat[start:start + p.size].reshape(p.shape), p.dtype))
                start += p.size


def new_run_dir(cfg, meta):
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"run directory {path} is not empty: use --resume {path} or another --run_dir")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output_dir) / f"{stamp}-{cfg.model}-{meta['dataset']}-{meta['protocol']}-seed{cfg.seed}"
        k = 1
        while path.exists():
            path = path.with_name(f"{path.name.split('+')[0]}+{k}")
            k += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_config(run_dir, overrides, cfg):
    """The saved config of a run, with only run-control keys overridable."""
    saved = Config.from_dict(read_json(Path(run_dir) / "config.json", "run config"))
    allowed = {"resume", "epochs", "patience", "max_steps", "device_target", "eval_batch_size"}
    changed = sorted(k for k in overrides - allowed if getattr(cfg, k) != getattr(saved, k))
    if changed:
        raise UserError(f"--resume keeps the run's configuration; cannot change {', '.join(changed)}")
    return saved.replace(**{k: getattr(cfg, k) for k in overrides & allowed}, run_dir=str(run_dir))


def train(cfg, overrides=frozenset()):
    """Train as `cfg` says; returns the run's metrics (also written to <run_dir>/metrics.json)."""
    if cfg.resume:
        cfg = resume_config(cfg.resume, set(overrides), cfg)
    ms = init_mindspore(cfg)
    from mindspore import nn
    from model import LossCell, build_model, check_inputs, describe

    world = World.setup(cfg)
    if world.is_scheduler:  # msrun's scheduler process: init() ran the job, nothing else to do
        return None
    data = load_dataset(cfg, quiet=not world.is_main)
    meta = data.meta
    names = meta["inputs"]
    train_arrays = world.shard(data.split("train"))
    val_arrays = data.split("val")
    check_inputs(meta, train_arrays)
    run_dir = Path(cfg.resume) if cfg.resume else (new_run_dir(cfg, meta) if world.is_main else None)
    run_dir = world.broadcast_path(run_dir)
    if world.is_main and not cfg.resume:
        write_json(run_dir / "config.json", cfg.to_dict())
        write_json(run_dir / "data_meta.json", {**meta, "cache": str(data.path)})
    if world.is_main:
        say(f"config: {json.dumps(cfg.to_dict())}")

    model = build_model(meta, cfg)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    step = nn.TrainOneStepCell(LossCell(model), optimizer)
    state = {"epoch": 0, "step": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}
    if cfg.resume:
        state = load_checkpoint(step, run_dir / "last.ckpt") or state
        say(f"resuming {run_dir} after epoch {state['epoch']} (step {state['step']})")
    info = describe(model)
    if world.is_main:
        say(f"model: {cfg.model} ({info['parameters']:,} parameters); run: {run_dir}; "
            f"{len(train_arrays['label']):,} training rows per {'rank' if world.size > 1 else 'epoch'}")

    n_train = len(train_arrays["label"])
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{n_train} training rows is less than one batch of {cfg.batch_size}: lower --batch_size")
    log_path = run_dir / f"log{world.suffix}.jsonl"
    for epoch in range(state["epoch"], cfg.epochs):
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            break
        step.set_train(True)
        started, losses = time.perf_counter(), []
        order = epoch_order(cfg.seed, epoch, n_train)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not world.is_main, dynamic_ncols=True, leave=False)
        for batch in batches(train_arrays, names + ["label"], cfg.batch_size, order):
            loss = float(step(*batch).asnumpy())
            if not math.isfinite(loss):
                bar.close()
                raise UserError(f"training diverged: loss is {loss} at epoch {epoch + 1}, step {state['step'] + 1}; "
                                f"the last good checkpoint is kept in {run_dir} (try a lower --lr)")
            losses.append(loss)
            state["step"] += 1
            bar.update(1)
            if len(losses) % 10 == 0:
                rate = len(losses) * cfg.batch_size * world.size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", samples_per_s=f"{rate:,.0f}")
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                break
        bar.close()
        world.sync_statistics(model)
        if not all(np.isfinite(p.asnumpy()).all() for p in model.get_parameters()):
            raise UserError(f"parameters are no longer finite after epoch {epoch + 1} (NaN or inf in the inputs or "
                            f"gradients); the last good checkpoint is kept in {run_dir}")
        train_seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)),
                  "train_seconds": round(train_seconds, 2), "params_md5": params_md5(model),
                  "samples_per_second": round(len(losses) * cfg.batch_size * world.size / train_seconds, 1)}
        val = evaluate(model, val_arrays, names, cfg.eval_batch_size)  # the same on every rank
        record.update(val_auc=val["auc"], val_logloss=val["logloss"])
        improved = val["auc"] > state["best_auc"]
        if improved:
            state.update(best_auc=val["auc"], best_epoch=epoch + 1, bad_epochs=0)
            if world.is_main:
                save_checkpoint(model, run_dir / "best.ckpt")
        else:
            state["bad_epochs"] += 1
        if world.is_main:
            say(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, val AUC {val['auc']:.4f}, "
                f"logloss {val['logloss']:.4f}, {record['samples_per_second']:,.0f} samples/s"
                + (" (best)" if improved else ""))
        state["epoch"] = epoch + 1
        state["seconds"] += time.perf_counter() - started
        if world.is_main:
            save_checkpoint(step, run_dir / "last.ckpt", state)
        record["seconds"] = round(time.perf_counter() - started, 2)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if state["bad_epochs"] >= cfg.patience > 0:
            say(f"early stop: no better validation AUC for {cfg.patience} epochs")
            break

    if not world.is_main:
        return None
    load_checkpoint(model, run_dir / "best.ckpt")
    test = evaluate(model, data.split("test"), names, cfg.eval_batch_size, with_gauc=True)
    history = [json.loads(line) for line in open(log_path)]
    metrics = {
        "model": cfg.model, "dataset": meta["dataset"], "synthetic": meta["synthetic"],
        "protocol": meta["protocol"], "leaky": meta["leaky"], "seed": cfg.seed, "parameters": info["parameters"],
        "decoupled": model.decoupled,
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "steps": state["step"],
        "val_auc": state["best_auc"], "test": test,
        "train_seconds": round(sum(h["train_seconds"] for h in history), 2),
        "seconds": round(state["seconds"], 2),
        "samples_per_second": float(np.median([h["samples_per_second"] for h in history])),
        "world_size": world.size,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    write_json(run_dir / "metrics.json", metrics)
    say(f"test ({'generated sample, SYNTHETIC' if meta['synthetic'] else meta['dataset']}, {meta['protocol']}"
        f"{', LEAKY' if meta['leaky'] else ''}): AUC {test['auc']:.4f}, logloss {test['logloss']:.4f}, "
        f"GAUC {test['gauc']:.4f} on {test['rows']:,} rows; best epoch {state['best_epoch']}; {run_dir}")
    return metrics


def main():
    cfg, overrides = parse_args(prog="train.py", description=__doc__.split("\n\n")[0])
    train(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
