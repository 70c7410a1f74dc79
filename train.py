"""Train IntTower (or a comparison model) and evaluate its best checkpoint.

    python train.py                                   # ML-1M if present, else the generated sample
    python train.py --data_path ../shared/data/ml-1m/ratings-all-users-no-timestamp.dat.gz --protocol paper
    python train.py --resume runs/RUN                 # continue an interrupted run

A run directory holds config.json, data_meta.json, log.jsonl (one line per epoch), metrics.json,
best.ckpt (the model at its best validation AUC) and last.ckpt (model + optimizer + loop state,
for --resume). The train step is compiled (GRAPH_MODE, nn.TrainOneStepCell) and fed whole batches
sliced from numpy arrays: the fastest setup measured here (docs/design.md, "Training step").
"""
import json
import math
import os
import resource
import shutil
import signal
import time
from pathlib import Path

# util first: it makes Ctrl-C during the imports below one line, not a traceback
from util import Interrupted, UserError, rss_anon_mb, run_cli, say, signals_mode, stop_requested, write_json

import numpy as np
from tqdm import tqdm

from get_dataset import load_dataset
from model_config import keys_of, parse_args
from runtime import (batches, epoch_order, evaluate, init_mindspore, load_checkpoint, params_md5, ranking_metrics,
                     restore_run, save_checkpoint, train_step)


# ---------------------------------------------------------------- the run

class World:
    """This process's place in a data-parallel job: rank 0 of 1, or one rank of an msrun launch.

    Every rank trains on its own shard (rows rank::size, as many on each) with the per-rank --batch_size;
    the gradient all-reduce (inserted by TrainOneStepCell under DATA_PARALLEL, gradients_mean=True) keeps the
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
        """Rows rank, rank + size, ... of the first n - n % size: every rank gets as many rows, hence as many
        steps (a rank with a step more would wait for the others' gradients forever)."""
        if self.size == 1:
            return arrays
        end = len(next(iter(arrays.values()))) // self.size * self.size
        return {k: v[self.rank:end:self.size] for k, v in arrays.items()}

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
        """Average the non-trainable float parameters (BatchNorm moving statistics) over the ranks; the
        dropout pools' offsets (integers) are equal on every rank: all take the same number of equal batches."""
        if self.size == 1:
            return
        import mindspore as ms
        from mindspore.common.dtype import float_type
        stats = [p for p in model.get_parameters() if not p.requires_grad and p.dtype in float_type]
        if stats:
            flat = self.sum(np.concatenate([p.asnumpy().ravel() for p in stats])) / self.size
            start = 0
            for p in stats:
                p.set_data(ms.Tensor(flat[start:start + p.size].reshape(p.shape), p.dtype))
                start += p.size


def choose_run_dir(cfg, meta):
    """The new run's directory (not created yet: see Trainer.keep)."""
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"run directory {path} is not empty: use --resume {path} or another --run_dir")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.output_dir) / f"{stamp}-{cfg.model}-{meta['dataset']}-{meta['protocol']}-seed{cfg.seed}"
    k = 1
    while path.exists():
        path = path.with_name(f"{path.name.split('+')[0]}+{k}")
        k += 1
    return path


def config_summary(cfg):
    """The keys that differ from the defaults (the whole config goes to the run's config.json)."""
    where = keys_of("run")  # the run directory is printed on its own
    changed = [f"{k}={v}" for k, v in cfg.changed().items() if k not in where]
    return f"{cfg.model}, " + (" ".join(changed) if changed else "defaults")


class Trainer:
    """One training run: its directory, model, compiled step and loop state (what last.ckpt stores)."""

    def __init__(self, cfg, data, world):
        self.cfg, self.data, self.world = cfg, data, world
        meta = data.meta
        self.names = meta["inputs"]
        self.train_arrays = world.shard(data.arrays("train"))
        self.val_arrays = data.arrays("val")
        from model import build_model, check_inputs, describe
        check_inputs(meta, self.train_arrays)
        self.n_train = len(self.train_arrays["label"])
        self.steps_per_epoch = self.n_train // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{self.n_train} training rows is less than one batch of {cfg.batch_size}: "
                            f"lower --batch_size")
        run_dir = Path(cfg.resume) if cfg.resume else (choose_run_dir(cfg, meta) if world.is_main else None)
        self.run_dir = world.broadcast_path(run_dir)
        self.created = False  # whether this process made the run directory (see keep / discard)
        if world.is_main:
            say(f"config: {config_summary(cfg)}")
        self.model = build_model(meta, cfg)
        if getattr(self.model, "cir_log_q", None) is not None:  # --cir_logq: item shares of all training rows
            ids = data.arrays("train")["item_sparse"][:, self.model.item_id]
            self.model.set_item_counts(np.bincount(ids, minlength=self.model.cir_log_q.shape[0]))
        self.step = train_step(self.model, cfg)
        self.state = {"epoch": 0, "step": 0, "best_auc": -1.0, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0}
        if cfg.resume and (self.run_dir / "last.ckpt").exists():
            self.state = load_checkpoint(self.step, self.run_dir / "last.ckpt") or self.state
            say(f"resuming {self.run_dir} after epoch {self.state['epoch']} (step {self.state['step']})")
        elif cfg.resume:
            say(f"{self.run_dir} has no checkpoint yet (stopped during its first epoch): training it from the start")
        self.parameters = describe(self.model)["parameters"]
        if world.is_main:
            say(f"model: {cfg.model} ({self.parameters:,} parameters); run: {self.run_dir}; "
                f"{self.n_train:,} training rows per {'rank' if world.size > 1 else 'epoch'}")
        self.log_path = self.run_dir / f"log{world.suffix}.jsonl"

    def keep(self):
        """Create the run directory with its config.json and data_meta.json: at the end of the first epoch,
        when there is a checkpoint to keep, so a refused or interrupted start leaves nothing behind."""
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.created = True
        if self.world.is_main and not (self.run_dir / "config.json").exists():
            write_json(self.run_dir / "config.json", self.cfg.to_dict())
            write_json(self.run_dir / "data_meta.json", {**self.data.meta, "cache": str(self.data.path)})

    def discard(self):
        """After a failure: a run directory this process made and that holds no checkpoint to resume from
        is removed (the directory of a run that has one is kept as it is)."""
        if self.created and self.world.is_main and not (self.run_dir / "last.ckpt").exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def stop_if_asked(self, epoch, where):
        """At a step boundary: raise Interrupted if SIGINT/SIGTERM arrived, saying what is kept."""
        signum = stop_requested()
        if signum is None:
            return
        name = signal.Signals(signum).name
        done = self.state["epoch"]
        if done:
            kept = f"{self.run_dir} keeps the model after epoch {done}: resume with python train.py --resume {self.run_dir}"
        else:
            kept = "before the first checkpoint: nothing was kept"
        raise Interrupted(signum, f"interrupted by {name} {where} epoch {epoch + 1} (step {self.state['step']}); {kept}")

    def budget_spent(self):
        return bool(self.cfg.max_steps) and self.state["step"] >= self.cfg.max_steps

    def train_epoch(self, epoch):
        """One pass over the shuffled training rows; returns the epoch's losses."""
        cfg, state = self.cfg, self.state
        self.step.set_train(True)
        started, losses = time.perf_counter(), []
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not self.world.is_main, dynamic_ncols=True, leave=False)
        order = epoch_order(cfg.seed, epoch, self.n_train)
        for batch in batches(self.train_arrays, self.names + ["label"], cfg.batch_size, order):
            loss = float(self.step(*batch).asnumpy())
            if not math.isfinite(loss):
                bar.close()
                raise UserError(f"training diverged: loss is {loss} at epoch {epoch + 1}, step {state['step'] + 1}; "
                                f"{self.kept_note()} (try a lower --lr)")
            losses.append(loss)
            state["step"] += 1
            bar.update(1)
            if stop_requested() is not None:
                bar.close()
                self.stop_if_asked(epoch, "during")
            if len(losses) % 10 == 0:
                rate = len(losses) * cfg.batch_size * self.world.size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", samples_per_s=f"{rate:,.0f}")
            if self.budget_spent():
                break
        bar.close()
        return losses

    def end_epoch(self, epoch, losses, started):
        """Validate, keep the best checkpoint, save the loop state, log the epoch; True: stop early."""
        cfg, state, world, model = self.cfg, self.state, self.world, self.model
        world.sync_statistics(model)
        if not all(np.isfinite(p.asnumpy()).all() for p in model.get_parameters()):
            raise UserError(f"parameters are no longer finite after epoch {epoch + 1} (NaN or inf in the inputs or "
                            f"gradients); {self.kept_note()}")
        train_seconds = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)),
                  "rss_anon_mb": rss_anon_mb(),
                  "train_seconds": round(train_seconds, 2), "params_md5": params_md5(model),
                  "samples_per_second": round(len(losses) * cfg.batch_size * world.size / train_seconds, 1)}
        val = evaluate(model, self.val_arrays, self.names, cfg.eval_batch_size)  # the same on every rank
        record.update(val_auc=val["auc"], val_logloss=val["logloss"])
        improved = val["auc"] > state["best_auc"]
        self.keep()
        if improved:
            state.update(best_auc=val["auc"], best_epoch=epoch + 1, bad_epochs=0)
            if world.is_main:
                save_checkpoint(model, self.run_dir / "best.ckpt")
        else:
            state["bad_epochs"] += 1
        if world.is_main:
            say(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, val AUC {val['auc']:.4f}, "
                f"logloss {val['logloss']:.4f}, {record['samples_per_second']:,.0f} samples/s"
                + (" (best)" if improved else ""))
        state["epoch"] = epoch + 1
        state["seconds"] += time.perf_counter() - started
        if world.is_main:
            save_checkpoint(self.step, self.run_dir / "last.ckpt", state)
        record["seconds"] = round(time.perf_counter() - started, 2)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if state["bad_epochs"] >= cfg.patience > 0:
            say(f"early stop: no better validation AUC for {cfg.patience} epochs")
            return True
        return False

    def kept_note(self):
        return (f"the last good checkpoint is kept in {self.run_dir}" if self.state["epoch"]
                else "no checkpoint had been written yet")

    def fit(self):
        """The epochs, with SIGINT/SIGTERM taken at step boundaries (util.signals_mode 'flag')."""
        with signals_mode("flag"):
            for epoch in range(self.state["epoch"], self.cfg.epochs):
                if self.budget_spent():
                    break
                started = time.perf_counter()
                stop = self.end_epoch(epoch, self.train_epoch(epoch), started)
                self.stop_if_asked(epoch, "at the end of")
                if stop:
                    break

    def test(self):
        """The best checkpoint on the test split; writes and returns metrics.json (rank 0 only)."""
        cfg, meta, state = self.cfg, self.data.meta, self.state
        load_checkpoint(self.model, self.run_dir / "best.ckpt")
        test = evaluate(self.model, self.data.arrays("test"), self.names, cfg.eval_batch_size, with_gauc=True)
        if cfg.ranking_ks:  # Recall@K, NDCG@K over the whole catalogue (eval.py --ranking_ks does the same)
            test.update(ranking_metrics(self.model, self.data, self.names, cfg.eval_batch_size, cfg.ranking_ks))
        history = [json.loads(line) for line in open(self.log_path)]
        metrics = {
            "model": cfg.model, "dataset": meta["dataset"], "synthetic": meta["synthetic"],
            "protocol": meta["protocol"], "leaky": meta["leaky"], "seed": cfg.seed, "parameters": self.parameters,
            "decoupled": self.model.decoupled,
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "steps": state["step"],
            "val_auc": state["best_auc"], "test": test,
            "train_seconds": round(sum(h["train_seconds"] for h in history), 2),
            "seconds": round(state["seconds"], 2),
            "samples_per_second": float(np.median([h["samples_per_second"] for h in history])),
            "world_size": self.world.size,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            # anonymous RSS (without memory-mapped split pages) at each epoch end and after the test: the max
            "rss_anon_mb": max([h["rss_anon_mb"] for h in history if h.get("rss_anon_mb")] + [rss_anon_mb() or 0]),
        }
        write_json(self.run_dir / "metrics.json", metrics)
        say(f"test ({'generated sample, SYNTHETIC' if meta['synthetic'] else meta['dataset']}, {meta['protocol']}"
            f"{', LEAKY' if meta['leaky'] else ''}): AUC {test['auc']:.4f}, logloss {test['logloss']:.4f}, "
            f"GAUC {test['gauc']:.4f} on {test['rows']:,} rows; best epoch {state['best_epoch']}; {self.run_dir}")
        return metrics


def train(cfg, overrides=frozenset()):
    """Train as `cfg` says; returns the run's metrics (also written to <run_dir>/metrics.json)."""
    if cfg.resume:  # the run's own config; only where it runs and its budget may change
        cfg = restore_run(cfg.resume, cfg, overrides, ("run", "budget")).replace(run_dir=str(cfg.resume))
    init_mindspore(cfg)
    world = World.setup(cfg)
    if world.is_scheduler:  # msrun's scheduler process: init() ran the job, nothing else to do
        return None
    trainer = Trainer(cfg, load_dataset(cfg, quiet=not world.is_main), world)
    try:
        trainer.fit()
    except BaseException:
        trainer.discard()
        raise
    return trainer.test() if world.is_main else None


def main():
    cfg, overrides = parse_args(prog="train.py", description=__doc__.split("\n\n")[0])
    train(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
