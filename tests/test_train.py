"""train.py / eval.py / model_config.py: learning, resume, checkpoints, NaN guard, config, eval errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
import train
from conftest import ROOT, needs_gxx
from eval import evaluate_run
from model_config import Config, parse_args
from util import UserError, auc


def small(tmp_path, **kw):
    cfg = Config(dataset="synthetic", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "runs"),
                 synthetic_users=400, synthetic_items=150, synthetic_ratings=40, mlp=(64, 32), heads=2,
                 head_dim=16, embed_dim=16, batch_size=256, eval_batch_size=4096, epochs=8, lr=0.005,
                 dropout=0.0, patience=3)
    return cfg.replace(**kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests below: (config, metrics, run directory)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = small(tmp, run_dir=str(tmp / "run"))
    metrics = train.train(cfg)
    return cfg, metrics, tmp / "run"


def test_learns_clearly_better_than_popularity(trained):
    cfg, metrics, run = trained
    import get_dataset
    test = get_dataset.load_dataset(cfg, quiet=True).arrays("test")
    popularity = auc(test["label"], test["item_dense"][:, 0])  # each movie's training positive rate
    assert metrics["steps"] >= 200
    assert metrics["test"]["auc"] > popularity + 0.03, (metrics["test"]["auc"], popularity)
    assert metrics["synthetic"] and not metrics["leaky"] and metrics["protocol"] == "temporal"


def test_run_directory_contents(trained):
    cfg, metrics, run = trained
    assert {"config.json", "data_meta.json", "log.jsonl", "metrics.json", "best.ckpt", "last.ckpt"} <= {
        p.name for p in run.iterdir()}
    saved = json.loads((run / "config.json").read_text())
    assert Config.from_dict(saved) == cfg
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, len(log) + 1))
    assert max(r["val_auc"] for r in log) == pytest.approx(metrics["val_auc"])
    assert log[np.argmax([r["val_auc"] for r in log])]["epoch"] == metrics["best_epoch"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    assert {"auc", "logloss", "gauc", "rows", "positive_rate"} <= set(on_disk["test"])
    # memory: peak RSS, and anonymous RSS (without memory-mapped split pages) where /proc has it
    assert 0 < on_disk["peak_rss_mb"] and (on_disk["rss_anon_mb"] is None or 0 < on_disk["rss_anon_mb"]
                                           <= on_disk["peak_rss_mb"])
    assert all("rss_anon_mb" in r for r in log)


def test_whole_split_auc_not_batch_mean(trained):
    """The reported AUC is the AUC of all predictions, whatever the evaluation batch size."""
    cfg, metrics, run = trained
    r1 = evaluate_run(Config(run_dir=str(run), eval_batch_size=64), {"run_dir", "eval_batch_size"})
    r2 = evaluate_run(Config(run_dir=str(run)), {"run_dir"})
    assert r1["auc"] == pytest.approx(r2["auc"], abs=1e-6) == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def test_eval_json(trained):
    cfg, metrics, run = trained
    report = evaluate_run(Config(run_dir=str(run)), {"run_dir"})
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["auc"] == pytest.approx(report["auc"]) and on_disk["checkpoint"].endswith("best.ckpt")
    assert {"auc", "logloss", "gauc", "rows", "positive_rate", "checkpoint", "protocol", "synthetic"} <= set(on_disk)
    assert on_disk["rows"] == metrics["test"]["rows"] and 0 < on_disk["positive_rate"] < 1
    assert 0.5 < on_disk["gauc"] < 1 and on_disk["logloss"] > 0


@pytest.mark.e2e
def test_resume_equals_uninterrupted(tmp_path, trained):
    """Interrupt after 3 epochs, resume: same metrics as one uninterrupted run (dropout 0)."""
    cfg, full, _ = trained
    part = small(tmp_path, run_dir=str(tmp_path / "run"), data_dir=cfg.data_dir, epochs=3)
    train.train(part)
    resumed = train.train(Config(resume=str(tmp_path / "run"), epochs=cfg.epochs), {"resume", "epochs"})
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["steps"] == full["steps"]
    assert resumed["test"]["auc"] == full["test"]["auc"] and resumed["test"]["logloss"] == full["test"]["logloss"]


@pytest.mark.e2e
def test_runs_with_dropout_repeat_exactly_and_resume_exactly(tmp_path):
    """Dropout masks come from a pool read in order (--dropout_masks pool), its position saved in checkpoints:
    two runs with dropout are identical, and so is a run interrupted after one epoch and resumed."""
    runs = [train.train(small(tmp_path, run_dir=str(tmp_path / f"run{k}"), dropout=0.3, epochs=3)) for k in (1, 2)]
    assert runs[0]["test"]["auc"] == runs[1]["test"]["auc"] and runs[0]["val_auc"] == runs[1]["val_auc"]
    train.train(small(tmp_path, run_dir=str(tmp_path / "part"), dropout=0.3, epochs=1))
    resumed = train.train(Config(resume=str(tmp_path / "part"), epochs=3), {"resume", "epochs"})
    assert resumed["steps"] == runs[0]["steps"] and resumed["val_auc"] == runs[0]["val_auc"]
    assert resumed["test"]["auc"] == runs[0]["test"]["auc"] and resumed["test"]["logloss"] == runs[0]["test"]["logloss"]


def test_checkpoint_without_dropout_offsets_loads(tmp_path):
    """A checkpoint written before module.Dropout saved its position on the pool (here: a model with nn.Dropout,
    the same parameters otherwise) loads, leaving the offsets as they are (0 in a new model); any other missing
    parameter is refused."""
    import mindspore as ms
    from model import build_model
    cfg = small(tmp_path, dropout=0.2, dropout_masks="kernel")
    meta = train.load_dataset(cfg).meta
    path = tmp_path / "old.ckpt"
    runtime.save_checkpoint(build_model(meta, cfg), path)
    pooled = build_model(meta, cfg.replace(dropout_masks="pool"))
    offsets = [p for name, p in pooled.parameters_and_names() if name.endswith("mask_offset")]
    assert offsets
    for p in offsets:
        p.set_data(ms.Tensor(5, ms.int64))
    runtime.load_checkpoint(pooled, path)
    assert all(int(p.asnumpy()) == 5 for p in offsets)  # untouched: an older checkpoint has none
    with pytest.raises(UserError, match="does not fit this model"):
        runtime.load_checkpoint(build_model(meta, cfg.replace(dropout_masks="pool", interaction="dot")), path)


def test_resume_refuses_config_changes(tmp_path, trained):
    cfg, _, run = trained
    with pytest.raises(UserError, match="cannot change lr"):
        train.train(Config(resume=str(run), lr=0.1), {"resume", "lr"})


@pytest.mark.e2e
@pytest.mark.parametrize("poison,kernel,message", [("label", "fused", "training diverged: loss is nan"),
                                                  pytest.param("user_dense", "fused", "training diverged: loss is nan",
                                                               marks=needs_gxx),
                                                  ("user_dense", "ops", "parameters are no longer finite")])
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, trained, monkeypatch, poison, kernel, message):
    """A NaN loss stops at once; NaN reaching the weights unseen (MindSpore's ReLU maps NaN to 0, hiding it from
    the loss; the fused BatchNorm-ReLU kernel passes it on, to the loss) stops at the end of the epoch. Either way
    the last good checkpoint stays."""
    cfg = small(tmp_path, run_dir=str(tmp_path / "run"), data_dir=trained[0].data_dir, epochs=3,
                batch_norm_kernel=kernel)
    real = train.batches
    calls = {"n": 0}

    def poisoned(arrays, names, batch_size, order=None, pad=False):
        import mindspore as ms
        for batch in real(arrays, names, batch_size, order, pad):
            if not pad:
                calls["n"] += 1
                if calls["n"] > 40:  # in the second epoch
                    batch = tuple(ms.Tensor(np.full(b.shape, np.nan, np.float32)) if n == poison else b
                                  for b, n in zip(batch, names))
            yield batch

    monkeypatch.setattr(train, "batches", poisoned)
    with pytest.raises(UserError, match=message):
        train.train(cfg)
    import mindspore as ms
    state = json.loads(str(ms.load_checkpoint(str(tmp_path / "run" / "last.ckpt"))["train_state"]))
    assert state["epoch"] == 1  # the last good checkpoint, loadable
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


def test_checkpoint_write_is_atomic(tmp_path, trained, monkeypatch):
    import mindspore as ms
    from model import build_model
    cfg, _, run = trained
    meta = json.loads((run / "data_meta.json").read_text())
    model = build_model(meta, cfg)
    path = tmp_path / "model.ckpt"
    runtime.save_checkpoint(model, path)
    before = path.read_bytes()

    def crash(params, name, **kw):  # dies half-way through writing
        open(name, "wb").write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint(model, path)
    assert path.read_bytes() == before and runtime.load_checkpoint(model, path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]


@pytest.mark.e2e
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, trained):
    """A real SIGKILL while a big checkpoint is being rewritten in a loop."""
    script = tmp_path / "saver.py"
    script.write_text(f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import mindspore as ms, numpy as np
from mindspore import nn
import runtime
net = nn.Dense(2000, 2000)
runtime.save_checkpoint(net, {str(tmp_path / 'big.ckpt')!r})
print("saved", flush=True)
while True:
    runtime.save_checkpoint(net, {str(tmp_path / 'big.ckpt')!r})
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from mindspore import nn
    net = nn.Dense(2000, 2000)
    runtime.load_checkpoint(net, tmp_path / "big.ckpt")  # loads: never half-written


def test_bad_checkpoints_clear_errors(tmp_path, trained):
    cfg, _, run = trained
    good = (run / "best.ckpt").read_bytes()
    cases = {
        "truncated.ckpt": (good[: len(good) // 3], "not a readable MindSpore checkpoint"),
        "text.ckpt": (b"hello, I am not a checkpoint\n", "not a readable MindSpore checkpoint"),
        "empty.ckpt": (b"", "not a readable MindSpore checkpoint"),
    }
    for name, (data, message) in cases.items():
        (run / name).write_bytes(data)
        with pytest.raises(UserError, match=message):
            evaluate_run(Config(run_dir=str(run), checkpoint=str(run / name)), {"run_dir", "checkpoint"})
    with pytest.raises(UserError, match="not found"):
        evaluate_run(Config(run_dir=str(run), checkpoint=str(run / "nope.ckpt")), {"run_dir", "checkpoint"})
    with pytest.raises(UserError, match="not a run directory"):
        evaluate_run(Config(run_dir=str(tmp_path)), {"run_dir"})


def test_checkpoint_of_other_config_or_vocabulary(tmp_path, trained):
    import shutil
    cfg, _, run = trained
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    # a checkpoint of another architecture
    (other / "config.json").write_text(json.dumps({**config, "mlp": [32, 16]}))
    with pytest.raises(UserError, match="shape"):
        evaluate_run(Config(run_dir=str(other)), {"run_dir"})
    (other / "config.json").write_text(json.dumps({**config, "interaction": "dot"}))
    with pytest.raises(UserError, match="does not fit this model"):
        evaluate_run(Config(run_dir=str(other)), {"run_dir"})
    # the same model on data with other vocabularies (another generated sample)
    (other / "config.json").write_text(json.dumps(config))
    import get_dataset
    get_dataset.generate_synthetic(tmp_path / "x", 300, 100, 30, seed=1)
    with pytest.raises(UserError, match="vocabulary sizes differ"):
        evaluate_run(Config(run_dir=str(other), dataset="synthetic", data_path=str(tmp_path / "x"),
                            data_dir=str(tmp_path / "d")), {"run_dir", "dataset", "data_path", "data_dir"})
    with pytest.raises(UserError, match="cannot change heads"):
        evaluate_run(Config(run_dir=str(other), heads=8), {"run_dir", "heads"})


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (["--bogus", "1"], "unknown option --bogus"),
    (["--lrr", "0.1"], "unknown option --lrr (did you mean --lr?)"),
    (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
    (["--mlp", "300,x"], "expected comma-separated integers"),
    (["--batch_norm", "maybe"], "expected true or false"),
])
def test_config_rejects_bad_options(args, message):
    with pytest.raises(SystemExit) as e:
        parse_args(args, prog="train.py")
    assert e.value.code == 2
    out = run_cli("train.py", *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr


def test_config_overrides_are_typed():
    cfg, keys = parse_args(["--mlp", "64,32", "--lr", "0.01", "--batch_norm", "false", "--download",
                            "--device_target", "GPU"])
    assert cfg.mlp == (64, 32) and cfg.lr == 0.01 and cfg.batch_norm is False and cfg.download is True
    assert cfg.device_target == "GPU" and keys == {"mlp", "lr", "batch_norm", "download", "device_target"}
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert Config().dropout_masks == "pool" and Config.from_dict({}).dropout_masks == "kernel"  # older runs
    defaults = Config()  # the published MindSpore values
    assert (defaults.batch_size, defaults.lr, defaults.dropout, defaults.mlp, defaults.heads, defaults.head_dim,
            defaults.embed_dim) == (2048, 5e-4, 0.1, (300, 300, 128), 4, 64, 32)


def test_config_changed_is_what_differs_from_the_defaults():
    """Config.changed(): what train.py's first log line and benchmark.py's JSON ("options") report."""
    cfg = Config().replace(lr=0.01, mlp=(8, 4), output_dir="x")
    assert cfg.changed() == {"lr": 0.01, "mlp": [8, 4], "output_dir": "x"} and Config().changed() == {}
    assert train.config_summary(cfg) == "inttower, mlp=[8, 4] lr=0.01"  # run keys are printed on their own
    assert train.config_summary(Config()) == "inttower, defaults"


def test_same_options_in_every_command():
    for script in ("train.py", "get_dataset.py"):
        out = run_cli(script, "--help")
        assert out.returncode == 0
        for key in ("--dataset", "--data_path", "--protocol", "--model", "--epochs", "--batch_size", "--lr",
                    "--seed", "--patience", "--device_target", "--output_dir", "--run_dir"):
            assert key in out.stdout, (script, key)
    # commands that read a trained run offer only what they may change: where the data is, how they run
    for script in ("eval.py", "export.py"):
        out = run_cli(script, "--help")
        assert out.returncode == 0
        for key in ("--dataset", "--data_path", "--device_target", "--run_dir", "--checkpoint"):
            assert key in out.stdout, (script, key)
        for key in ("--model", "--lr", "--epochs", "--protocol", "--heads"):
            assert key not in out.stdout, (script, key)
        out = run_cli(script, "--run_dir", "x", "--lr", "0.1")
        assert out.returncode == 2 and "--lr is fixed by the trained run" in out.stderr
    assert "--last_layer_only" in run_cli("export.py", "--help").stdout


@pytest.mark.slow
@pytest.mark.realdata
def test_real_ml1m_the_paper_protocol_leak(tmp_path):
    """Same split, same model, 2 epochs: the published protocol's features (label means of each split)
    inflate the test AUC well beyond the leak-free protocol's."""
    from conftest import real_file
    path = real_file("ratings-all-users-no-timestamp.dat.gz")
    results = {}
    for protocol in ("paper", "random"):
        cfg = Config(data_path=str(path), protocol=protocol, data_dir=str(tmp_path / "data"), epochs=2, patience=0,
                     run_dir=str(tmp_path / protocol))
        results[protocol] = train.train(cfg)["test"]["auc"]
    # measured: paper 0.8897, random 0.8633 (seed 2022); seed-to-seed spread is a few thousandths
    assert results["paper"] > 0.88 and results["random"] > 0.85
    assert results["paper"] - results["random"] > 0.015, results


class ScoreByItemId:
    """A stand-in model for ranking_metrics: the score of a pair is a fixed function of its item id."""

    def __init__(self, names):
        self.column = names.index("item_sparse")

    def set_train(self, mode):
        pass

    def __call__(self, *batch):
        import mindspore as ms
        ids = batch[self.column].asnumpy()[:, 0].astype(np.float32)
        return ms.Tensor(np.sin(ids * 1.7))


def test_ranking_metrics_match_a_loop_over_users(tiny_cfg):
    """Recall@K and NDCG@K over the catalogue, items with a training row for the user left out, checked
    against a plain loop written here."""
    from get_dataset import load_dataset
    from runtime import ranking_metrics
    data = load_dataset(tiny_cfg, quiet=True)
    names = data.meta["inputs"]
    got = ranking_metrics(ScoreByItemId(names), data, names, 512, ks=(5, 20))
    items, train, test = data.arrays("items"), data.arrays("train"), data.arrays("test")
    score = {int(k): np.sin(np.float32(i) * np.float32(1.7)) for k, i in zip(items["key"], items["item_sparse"][:, 0])}
    expected = {"recall@5": [], "recall@20": [], "ndcg@5": [], "ndcg@20": []}
    for user in np.unique(test["user_key"][test["label"] > 0.5]):
        wanted = set(test["item_key"][(test["user_key"] == user) & (test["label"] > 0.5)].tolist())
        seen = set(train["item_key"][train["user_key"] == user].tolist())
        ranked = sorted((k for k in score if k not in seen), key=lambda k: -score[k])
        for k in (5, 20):
            hits = [item in wanted for item in ranked[:k]]
            expected[f"recall@{k}"].append(sum(hits) / len(wanted))
            ideal = sum(1 / np.log2(r + 2) for r in range(min(len(wanted), k)))
            expected[f"ndcg@{k}"].append(sum(h / np.log2(r + 2) for r, h in enumerate(hits)) / ideal)
    assert got["users_ranked"] == len(expected["recall@5"]) > 10
    for name, values in expected.items():
        assert got[name] == pytest.approx(np.mean(values), abs=1e-6), name
    assert 0 < got["recall@5"] < got["recall@20"] < 1


def test_ranking_ks_in_train_metrics_and_eval(tiny_cfg):
    """--ranking_ks: train.py's test metrics and eval.py's report carry the same Recall@K / NDCG@K."""
    cfg = tiny_cfg.replace(run_dir=str(Path(tiny_cfg.output_dir) / "ranked"), epochs=1, ranking_ks=(5, 20))
    metrics = train.train(cfg)
    report = evaluate_run(Config(run_dir=cfg.run_dir, ranking_ks=(5, 20)), {"run_dir", "ranking_ks"})
    for name in ("recall@5", "recall@20", "ndcg@5", "ndcg@20"):
        assert 0 <= metrics["test"][name] <= 1 and report[name] == pytest.approx(metrics["test"][name])
    assert metrics["test"]["users_ranked"] == report["users_ranked"] > 0


def test_cir_logq_item_shares_come_from_the_training_rows(tiny_cfg):
    """--cir_logq: train.py sets the model's log item shares from every training row (kept in the checkpoint)."""
    import mindspore as ms
    from get_dataset import id_field, load_dataset
    cfg = tiny_cfg.replace(run_dir=str(Path(tiny_cfg.output_dir) / "logq"), epochs=1, cir_logq=True)
    train.train(cfg)
    data = load_dataset(cfg, quiet=True)
    column = id_field(data.meta["towers"], "item")
    ids = data.arrays("train")["item_sparse"][:, column]
    counts = np.bincount(ids, minlength=data.meta["towers"]["item"]["sparse"][column]["vocab_size"]) + 1.0
    params = ms.load_checkpoint(str(Path(cfg.run_dir) / "last.ckpt"))
    [saved] = [p.asnumpy() for name, p in params.items() if name.endswith("cir_log_q")]
    np.testing.assert_allclose(saved, np.log(counts / counts.sum()), rtol=1e-5)


def test_ranks_get_disjoint_shards_of_equal_size():
    """Each rank of a data-parallel job takes as many rows (hence steps): a step more on one rank would wait
    for the others' gradients forever."""
    arrays = {"label": np.arange(7), "x": np.arange(7) * 10}
    shards = []
    for rank in range(3):
        world = train.World()
        world.size, world.rank = 3, rank
        shards.append(world.shard(arrays))
    assert [len(s["label"]) for s in shards] == [2, 2, 2]
    assert sorted(np.concatenate([s["label"] for s in shards])) == list(range(6))
    assert all((s["x"] == s["label"] * 10).all() for s in shards)
    assert train.World().shard(arrays) is arrays


def test_rank_sync_averages_float_statistics_and_leaves_dropout_offsets(tmp_path):
    """At an epoch end the BatchNorm moving statistics are averaged over the ranks; the dropout pools' offsets
    (int64, equal on every rank) are left alone: through float32 an offset above 2**24 would be rounded."""
    import mindspore as ms
    from model import build_model
    cfg = small(tmp_path, dropout=0.2)
    model = build_model(train.load_dataset(cfg).meta, cfg)
    offsets = [p for name, p in model.parameters_and_names() if name.endswith("mask_offset")]
    means = [p for name, p in model.parameters_and_names() if name.endswith("moving_mean")]
    assert offsets and means
    for p in offsets:
        p.set_data(ms.Tensor(2 ** 40 + 1, ms.int64))
    world = train.World()
    world.size = 2
    world.sum = lambda values: values + 1.0  # the other rank: every statistic 1 higher -> average + 0.5
    world.sync_statistics(model)
    assert all(int(p.asnumpy()) == 2 ** 40 + 1 for p in offsets)
    assert all(np.allclose(p.asnumpy(), 0.5) for p in means)
