"""run_experiments.py on the generated sample: the tuning grid, reuse of finished runs, the tables."""
import csv
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

import run_experiments as rx
from conftest import ROOT
from model_config import Config
from util import UserError

TINY = ["--dataset", "synthetic", "--synthetic_users", "300", "--synthetic_items", "100", "--synthetic_ratings", "30",
        "--mlp", "16", "--embed_dim", "4", "--batch_size", "512", "--epochs", "1"]


def sweep(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "run_experiments.py"), *args, "--results", str(tmp_path / "results"),
           "--data_dir", str(tmp_path / "data"), "--no_latency", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_grid_parsing_and_names():
    args = SimpleNamespace(tune=["lr=0.001,0.002", "dropout=0.1,0.3"], tune_lr="")
    assert rx.grid(args) == [("lr", ["0.001", "0.002"]), ("dropout", ["0.1", "0.3"])]
    assert rx.grid(SimpleNamespace(tune=[], tune_lr="0.5")) == [("lr", ["0.5"])]
    base = Config()
    # the default dropout is not part of the name, so runs of an lr-only grid are reused by a wider one
    assert rx.tuning_name("dat", (("lr", "0.001"), ("dropout", "0.10")), base) == "tune-dat-lr0.001"
    assert rx.tuning_name("dat", (("lr", "0.001"), ("dropout", "0.3")), base) == "tune-dat-lr0.001-dropout0.3"
    assert rx.tuning_name("dat", (("dropout", "0.3"),), base) == f"tune-dat-lr{base.lr}-dropout0.3"
    for bad in (["lr"], ["lr="], ["lr=1", "lr=2"]):
        with pytest.raises(UserError, match="key=value1,value2"):
            rx.grid(SimpleNamespace(tune=bad, tune_lr=""))


@pytest.mark.e2e
def test_tuning_picks_best_validation_and_reuses_the_run(tmp_path):
    log = sweep(tmp_path, "--models", "lr", "--seeds", "1", "--protocols", "temporal", "--tune", "lr=0.0002,0.05")
    out = tmp_path / "results"
    table = (out / "tuning-lr.md").read_text()
    scores = {lr: json.loads((out / "runs" / f"tune-lr-lr{lr}" / "metrics.json").read_text())["val_auc"]
              for lr in ("0.0002", "0.05")}
    best = max(scores, key=scores.get)
    assert f"| lr {best} |" in table and f"{scores['0.0002']:.4f}" in table
    final = out / "runs" / "lr-temporal-seed1"
    assert json.loads((final / "config.json").read_text())["lr"] == float(best)
    # the final seed-1 run has the chosen setting's arguments: copied from its tuning run, not retrained
    assert log.count("done in") == 2
    assert json.loads((final / "metrics.json").read_text())["val_auc"] == scores[best]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["run"] for r in rows] == ["lr-temporal-seed1"]  # tuning runs are not results
    assert "| lr | 1 |" in (out / "temporal.md").read_text()

    # same command again: nothing is trained; another setting asked for: that run is trained again
    assert "done in" not in sweep(tmp_path, "--models", "lr", "--seeds", "1", "--protocols", "temporal",
                                  "--tune", "lr=0.0002,0.05")
    other = "0.05" if best == "0.0002" else "0.0002"
    log = sweep(tmp_path, "--models", "lr", "--seeds", "1", "--protocols", "temporal", "--lr", other)
    assert "trained with other settings" in log and log.count("done in") == 1
    assert json.loads((final / "config.json").read_text())["lr"] == float(other)


def test_changed_ignores_where_a_run_was_trained(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = Config(lr=0.002, data_dir="/elsewhere", data_path="a.dat").to_dict()
    (run / "config.json").write_text(json.dumps({**saved, "key_of_an_older_version": 1}))
    assert rx.changed(run, ["--lr", "0.002", "--data_dir", "data"]) == []
    assert rx.changed(run, ["--lr", "0.001"]) == ["lr 0.002 -> 0.001"]
    assert rx.changed(run, ["--lr", "0.002", "--dropout", "0.3"]) == ["dropout 0.1 -> 0.3"]


def test_ablations_are_not_tuned_and_take_their_models_setting(tmp_path, monkeypatch):
    """--ablations with --tune: the grid runs for the models only; every ablation gets its model's choice."""
    trained = []

    def fake_run_all(runs, passthrough, out, done=None):  # validation AUC 0.7 at lr 0.001, 0.6 otherwise
        for name, variant, model, protocol, seed, extra in runs:
            if (out / "runs" / name / "metrics.json").exists():  # as run_all: a finished run is not repeated
                continue
            trained.append(variant)
            (out / "runs" / name).mkdir(parents=True)
            lr = extra[extra.index("--lr") + 1]
            (out / "runs" / name / "metrics.json").write_text(json.dumps({"val_auc": 0.7 if lr == "0.001" else 0.6}))

    monkeypatch.setattr(rx, "run_all", fake_run_all)
    args = SimpleNamespace(models="inttower,lr", ablations=True, seeds="1,2", protocols="paper,temporal",
                           tune=["lr=0.001,0.002"], tune_lr="", tune_protocol="temporal", done={},
                           paper_data=None, temporal_data=None)
    chosen = rx.tune(args, [], tmp_path)
    assert sorted(trained) == ["inttower", "inttower", "lr", "lr"]
    runs = rx.with_settings(rx.plan(args), chosen)
    assert len(runs) == (2 + len(rx.ABLATIONS)) * 2 * 2
    for name, variant, model, protocol, seed, extra in runs:
        assert extra[-2:] == ["--lr", "0.001"], (name, extra)
    ablation = next(r for r in runs if r[1] == "w/o CIR")
    assert ablation[2] == "inttower" and ["--cir_weight", "0"] == ablation[5][-4:-2]

    some = rx.plan(SimpleNamespace(**{**vars(args), "ablations": "w/o CIR,FE sum over heads"}))
    assert sorted({r.variant for r in some}) == ["FE sum over heads", "inttower", "lr", "w/o CIR"]
    with pytest.raises(UserError, match="unknown ablation"):
        rx.plan(SimpleNamespace(**{**vars(args), "ablations": "w/o CIR,no such thing"}))

    # a later sweep of one model rewrites the tuning table with the rows of the earlier one kept
    trained.clear()
    (tmp_path / "runs" / "tune-lr-lr0.001").rename(tmp_path / "old")
    chosen = rx.tune(SimpleNamespace(**{**vars(args), "models": "lr", "ablations": False}), [], tmp_path)
    assert trained == ["lr"] and set(chosen) == {"inttower", "lr"}
    table = (tmp_path / "tuning-lr.md").read_text()
    assert table.index("| lr |") < table.index("| inttower |")  # in the order of the results tables


def test_paired_differences_match_scipy_and_pair_by_seed():
    from scipy.stats import ttest_rel
    groups = {"inttower": [{"seed": s, "test_auc": a} for s, a in ((1, 0.90), (2, 0.91), (3, 0.905))],
              "two_tower": [{"seed": s, "test_auc": a} for s, a in ((3, 0.89), (1, 0.885), (2, 0.902))],
              "cold": [{"seed": 2, "test_auc": 0.95}]}
    lines = rx.paired_differences(groups)
    row = next(line for line in lines if line.startswith("| two_tower |"))
    p = ttest_rel([0.90, 0.91, 0.905], [0.885, 0.902, 0.89]).pvalue
    assert row == f"| two_tower | 3 | +0.0150, +0.0080, +0.0150 | +0.0127 | {p:.3g} |"
    assert next(line for line in lines if line.startswith("| cold |")) == "| cold | 1 | -0.0400 | -0.0400 | nan |"
    assert rx.paired_differences({"two_tower": groups["two_tower"]}) == []


def test_ranking_table_lists_every_measured_k_in_order():
    groups = {"inttower": [{"seed": 1, "recall@10": 0.1, "recall@200": 0.5, "ndcg@10": 0.2},
                           {"seed": 2, "recall@10": 0.3, "recall@200": 0.7, "ndcg@10": 0.4}],
              "two_tower": [{"seed": 1}]}
    lines = rx.ranking_table(groups)
    assert lines[3] == "| model | seeds | ndcg@10 | recall@10 | recall@200 |"
    assert lines[5] == "| inttower | 2 | 0.3000 ± 0.1414 | 0.2000 ± 0.1414 | 0.6000 ± 0.1414 |"
    assert len(lines) == 6 and rx.ranking_table({"two_tower": [{"seed": 1}]}) == []


def test_report_from_json_only_runs_marks_latency_unmeasured(tmp_path):
    """A fresh clone holds a sweep's JSON files, not its checkpoints: the tables are written, latency '-'."""
    out = tmp_path / "results"
    for seed, auc in ((1, 0.85), (2, 0.86)):
        run = out / "runs" / f"two_tower-temporal-seed{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"model": "two_tower"}))
        (run / "experiment.json").write_text(json.dumps({"variant": "two_tower", "model": "two_tower"}))
        (run / "metrics.json").write_text(json.dumps({
            "protocol": "temporal", "dataset": "ml-1m", "seed": seed, "val_auc": auc, "best_epoch": 3,
            "parameters": 10, "train_seconds": 1.0, "decoupled": True,
            "test": {"auc": auc, "logloss": 0.4, "gauc": 0.8, "rows": 100}}))
    assert rx.scoring_latency(sorted((out / "runs").iterdir())) is None
    rx.report(out)
    table = (out / "temporal.md").read_text()
    assert "| two_tower | 2 | 0.8550 ± 0.0071 |" in table and table.split("\n")[4].endswith("| 3, 3 | - |")
