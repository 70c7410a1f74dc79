"""Train and evaluate any subset of models x ablations x seeds x protocols, and write the results tables.

    python run_experiments.py --models all --seeds 1,2,3 --protocols paper,temporal
    python run_experiments.py --models inttower --ablations --seeds 1,2,3 --protocols paper
    python run_experiments.py --models inttower --ablations "w/o CIR" ...   # some ablations, by name
    python run_experiments.py --report                      # only rebuild the tables from finished runs
    python run_experiments.py --models all --tune lr=0.0005,0.002 --tune dropout=0.1,0.3  # pick per model on validation

Every run is `python train.py ...` in its own process, in results/runs/<model>-<protocol>-seed<N>;
a finished run is not repeated unless it was trained with other settings, so an interrupted sweep
continues where it stopped.
Config keys of train.py (--data_path, --epochs, --lr...) apply to every run; --paper_data and
--temporal_data give a protocol its own ratings file (e.g. the genuine files of ../shared/data/ml-1m:
all ratings without timestamps for paper, users 1-2999 with timestamps for temporal).

--tune key=v1,v2 (repeatable) first trains each model with every setting of the grid on the first
seed under --tune_protocol and keeps the one with the best validation AUC (results/tuning-<keys>.md);
the ablations of a model are trained with the setting chosen for it.
Writes results/results.csv (one row per run), results/<protocol>.md (mean +- std over seeds: AUC,
logloss, parameters, training time, and for decoupled models the latency of scoring 10,000
candidates from the item index) and results/ablation.png (the paper's Figure 6(a)).
"""
import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from model_config import MODELS, keys_of, parse_args
from util import ROOT, UserError, median_ms, run_cli, say

ABLATIONS = {  # the paper's Figure 6(a): IntTower with one module removed or replaced
    "w/o Light-SE": {"se": "none"},
    "Light-SE -> SENET": {"se": "senet"},
    "w/o FE-Block": {"interaction": "dot"},
    "FE-Block -> FC": {"interaction": "fc"},
    "w/o CIR": {"cir_weight": "0"},
    # not in the paper: this implementation's own choices against the alternatives
    "CIR over all rows": {"cir_anchors": "0"},  # our 512-anchor CIR against the full matrix
    "FE sum over heads": {"fe_mean": "false"},  # the paper's formula, against our mean over the user heads
    "FE on layer inputs": {"fe_layers": "inputs"},  # what the published code projects, against layer outputs
    "CIR with log-Q": {"cir_logq": "true"},  # CIR's in-batch negatives corrected for item popularity
    "CIR unmasked": {"cir_mask_same_item": "false"},  # the anchor's own item elsewhere in the batch a negative
}
ORDER = list(MODELS)  # the registry's order: pre-ranking models, then ranking models
IGNORED = keys_of("source", "run")  # where the data is and how a run ran: no reason to train a finished run again


class Run(NamedTuple):
    name: str       # the run's folder under <results>/runs
    variant: str    # a model, or an ablation of IntTower
    model: str
    protocol: str
    seed: int
    args: list      # train.py arguments


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def grid(args):
    """--tune key=v1,v2 (repeatable; --tune_lr V is --tune lr=V) -> [(key, [values])] in the order given."""
    specs = list(args.tune) + ([f"lr={args.tune_lr}"] if args.tune_lr else [])
    keys = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not values or key in dict(keys):
            raise UserError(f"--tune {spec!r}: expected key=value1,value2,... with each key once (e.g. --tune lr=0.001,0.002)")
        keys.append((key, values.split(",")))
    return keys


def tuning_name(variant, setting, base):
    """tune-<variant>-lr<lr>[-<key><value> for each other key whose value differs from `base`]."""
    lr = dict(setting).get("lr", str(base.lr))
    rest = "".join(f"-{k}{v}" for k, v in setting
                   if k != "lr" and getattr(parse_args([f"--{k}", v])[0], k) != getattr(base, k))
    return f"tune-{variant}-lr{lr}{rest}"


def tune(args, passthrough, out):
    """Per variant, the setting of the --tune grid with the best validation AUC (first seed, --tune_protocol)."""
    keys = grid(args)
    if not keys:
        return {}
    base = parse_args(passthrough, prog="run_experiments.py")[0]
    for key, values in keys:  # reject a bad key or value before training anything
        for value in values:
            parse_args([*passthrough, f"--{key}", value], prog="run_experiments.py --tune")
    settings = [tuple(zip([k for k, _ in keys], combo)) for combo in itertools.product(*(v for _, v in keys))]
    seed = int(args.seeds.split(",")[0])
    runs = []
    for run in plan(args, protocols=[args.tune_protocol], seeds=[seed]):
        if run.variant != run.model:  # an ablation is trained with the setting chosen for its model
            continue
        for setting in settings:
            runs.append(run._replace(name=tuning_name(run.variant, setting, base),
                                     args=run.args + [a for k, v in setting for a in (f"--{k}", v)]))
    run_all(runs, passthrough, out, args.done)
    label = lambda setting: ", ".join(f"{k} {v}" for k, v in setting)  # noqa: E731
    best, lines = {}, ["# Hyper-parameter check", "", f"protocol `{args.tune_protocol}`, seed {seed}, validation AUC "
                       "(the test split is not looked at)", "", "| model | " + " | ".join(map(label, settings)) +
                       " | chosen |", "|---|" + "---|" * (len(settings) + 1)]
    metrics = lambda variant, s: out / "runs" / tuning_name(variant, s, base) / "metrics.json"  # noqa: E731
    asked = {r.variant for r in runs}  # and the models tuned on this grid by an earlier sweep, in table order
    for variant in [v for v in ORDER if v in asked or all(metrics(v, s).exists() for s in settings)]:
        scores = {s: json.loads(metrics(variant, s).read_text())["val_auc"] for s in settings}
        best[variant] = max(settings, key=scores.get)
        lines.append(f"| {variant} | " + " | ".join(f"{scores[s]:.4f}" for s in settings) +
                     f" | {label(best[variant])} |")
    (out / f"tuning-{'-'.join(k for k, _ in keys)}.md").write_text("\n".join(lines) + "\n")
    say("chosen on validation AUC: " + "; ".join(f"{v}: {label(s)}" for v, s in best.items()))
    return {variant: [a for k, v in setting for a in (f"--{k}", v)] for variant, setting in best.items()}


def with_settings(runs, chosen):
    """Append each run's tuned arguments: its variant's, else (an ablation) those of its model."""
    return [run._replace(args=run.args + chosen.get(run.variant, chosen.get(run.model, []))) for run in runs]


def plan(args, protocols=None, seeds=None):
    """Every Run asked for."""
    models = ORDER if args.models == "all" else args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    variants = [(m, m, {}) for m in models]
    if args.ablations:
        names = list(ABLATIONS) if args.ablations in (True, "all") else args.ablations.split(",")
        unknown = [n for n in names if n not in ABLATIONS]
        if unknown:
            raise UserError(f"unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
        variants += [("inttower", name, ABLATIONS[name]) for name in names]
    runs = []
    for protocol in protocols or args.protocols.split(","):
        data = getattr(args, f"{protocol}_data", None)
        for model, variant, changes in variants:
            for seed in seeds or [int(s) for s in args.seeds.split(",")]:
                name = f"{slug(variant)}-{protocol}-seed{seed}"
                extra = ["--model", model, "--protocol", protocol, "--seed", str(seed)]
                extra += ["--data_path", data] if data else []
                for key, value in changes.items():
                    extra += [f"--{key}", value]
                runs.append(Run(name, variant, model, protocol, seed, extra))
    return runs


def changed(run_dir, train_args):
    """The settings a finished run in run_dir was trained with that differ from train_args' ([] if none)."""
    planned = parse_args(train_args, prog="run_experiments.py")[0].to_dict()
    saved = json.loads((run_dir / "config.json").read_text())
    return [f"{k} {saved[k]} -> {planned[k]}" for k in sorted(set(saved) & set(planned) - IGNORED)
            if saved[k] != planned[k]]


def run_all(runs, passthrough, out, done=None):
    """Run what is not finished yet; `done` maps train.py arguments to a finished run with the same ones.

    A finished run is kept only when it was trained with the settings asked for now; otherwise it is
    trained again (e.g. when a wider --tune grid chose another setting for its model)."""
    import shutil
    done = {} if done is None else done
    for k, run in enumerate(runs, 1):
        name, extra = run.name, run.args
        run_dir = out / "runs" / name
        if (run_dir / "metrics.json").exists():
            diff = changed(run_dir, [*passthrough, *extra])
            if not diff:
                done.setdefault(tuple(extra), run_dir)
                continue
            say(f"{name} was trained with other settings ({'; '.join(diff)}): training it again")
        if run_dir.exists():  # an interrupted run: start it again
            shutil.rmtree(run_dir)
        if tuple(extra) in done:  # the same training already ran (a tuning run): reuse it
            shutil.copytree(done[tuple(extra)], run_dir, ignore=shutil.ignore_patterns("export"))
            (run_dir / "experiment.json").write_text(json.dumps({"variant": run.variant, "model": run.model}))
            continue
        say(f"[{k}/{len(runs)}] {run.variant}, {run.protocol}, seed {run.seed}")
        cmd = [sys.executable, str(ROOT / "train.py"), *passthrough, *extra, "--run_dir", str(run_dir)]
        started = time.time()
        log = out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            raise UserError(f"run {name} failed (exit {code}); see {log}")
        (run_dir / "experiment.json").write_text(json.dumps({"variant": run.variant, "model": run.model}))
        done[tuple(extra)] = run_dir
        say(f"    done in {time.time() - started:.0f} s")


def scoring_latency(run_dirs, n=10_000, repeats=200):
    """Median ms to score n candidates for one user from an exported item index (tiled to n rows), from the
    first of `run_dirs` (runs of one variant: the same shapes) with an export or a checkpoint to export; None
    when none has (a fresh clone holds the runs' JSON files only)."""
    from scorer import Scorer, tiled_scoring
    for run_dir in run_dirs:
        export = run_dir / "export"
        if not (export / "manifest.json").exists() and (run_dir / "best.ckpt").exists():
            code = subprocess.call([sys.executable, str(ROOT / "export.py"), "--run_dir", str(run_dir)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if code != 0:
                raise UserError(f"exporting {run_dir} failed (exit {code}): run python export.py --run_dir {run_dir}")
        if (export / "manifest.json").exists():
            return median_ms(tiled_scoring(Scorer(export), n), repeats)
    return None


def collect(out):
    rows = []
    for metrics_file in sorted((out / "runs").glob("*/metrics.json")):
        run_dir = metrics_file.parent
        if run_dir.name.startswith("tune-"):
            continue
        m = json.loads(metrics_file.read_text())
        cfg = json.loads((run_dir / "config.json").read_text())
        info = run_dir / "experiment.json"
        variant = json.loads(info.read_text())["variant"] if info.exists() else cfg["model"]
        rows.append({"run": run_dir.name, "variant": variant, "model": cfg["model"], "protocol": m["protocol"],
                     "dataset": m["dataset"], "seed": m["seed"], "test_auc": m["test"]["auc"],
                     "test_logloss": m["test"]["logloss"], "test_gauc": m["test"]["gauc"], "val_auc": m["val_auc"],
                     "best_epoch": m["best_epoch"], "parameters": m["parameters"],
                     "train_seconds": m["train_seconds"], "decoupled": m.get("decoupled", False),
                     "rows_test": m["test"]["rows"], **{k: v for k, v in m["test"].items() if "@" in k}})
    return rows


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(out, latency=True):
    rows = collect(out)
    if not rows:
        raise UserError(f"no finished runs in {out / 'runs'}")
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # ranking metrics only where a run has them
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    for protocol in sorted({r["protocol"] for r in rows}):
        dataset = next(r["dataset"] for r in rows if r["protocol"] == protocol)
        lines = [f"# Results: {dataset}, protocol `{protocol}`", ""]
        if protocol == "paper":
            lines += ["The `paper` protocol computes the mean-rating features of every split from that split's own "
                      "labels (the published code's leak): its numbers are optimistic.", ""]
        lines += ["| model | seeds | test AUC | test logloss | GAUC | paper AUC | parameters | train s | "
                  "best epochs | ms / 10k candidates |", "|---|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for r in rows:
            if r["protocol"] == protocol:
                groups.setdefault(r["variant"], []).append(r)
        order = ORDER + list(ABLATIONS)
        for variant in sorted(groups, key=lambda v: order.index(v) if v in order else 99):
            g = groups[variant]
            took = scoring_latency([out / "runs" / r["run"] for r in g]) if latency and g[0]["decoupled"] else None
            lat = f"{took:.2f}" if took is not None else "-"
            paper_auc = MODELS[variant].paper_auc if protocol == "paper" and variant in MODELS else None
            lines.append(f"| {variant} | {len(g)} | {mean_std([r['test_auc'] for r in g])} | "
                         f"{mean_std([r['test_logloss'] for r in g])} | {mean_std([r['test_gauc'] for r in g])} | "
                         f"{paper_auc if paper_auc else '-'} | {g[0]['parameters']:,} | "
                         f"{statistics.mean(r['train_seconds'] for r in g):.0f} | "
                         f"{', '.join(str(r['best_epoch']) for r in sorted(g, key=lambda r: r['seed']))} | {lat} |")
        lines += ["", "ms / 10k candidates: MaxSim or dot product of one user against 10,000 indexed items, measured "
                  "on an exported run of the variant (-: coupled, --no_latency, or no checkpoint of it in this checkout)."]
        lines += paired_differences(groups) + ranking_table(groups)
        (out / f"{protocol}.md").write_text("\n".join(lines) + "\n")
        say(f"written {out / f'{protocol}.md'}")
    plot_ablation(rows, out)


def paired_differences(groups, reference="inttower"):
    """Table lines: test AUC of `reference` minus each other variant's, seed by seed (the seeds both ran),
    their mean and the two-sided paired t-test p-value (nan with fewer than two seeds)."""
    if reference not in groups:
        return []
    from scipy.stats import ttest_rel
    ours = {r["seed"]: r["test_auc"] for r in groups[reference]}
    lines = ["", f"Paired by seed: test AUC of {reference} minus each model's (same split and initialisation seed).",
             "", "| model | seeds | differences | mean | p (paired t-test) |", "|---|---|---|---|---|"]
    for variant, g in groups.items():
        theirs = {r["seed"]: r["test_auc"] for r in g}
        seeds = sorted(set(ours) & set(theirs))
        if variant == reference or not seeds:
            continue
        diffs = [ours[k] - theirs[k] for k in seeds]
        p = ttest_rel([ours[k] for k in seeds], [theirs[k] for k in seeds]).pvalue if len(seeds) > 1 else float("nan")
        lines.append(f"| {variant} | {len(seeds)} | {', '.join(f'{d:+.4f}' for d in diffs)} | "
                     f"{statistics.mean(diffs):+.4f} | {p:.3g} |")
    return lines


def ranking_table(groups):
    """Table lines: mean ± std over seeds of every Recall@K / NDCG@K the runs measured (train.py --ranking_ks)."""
    names = sorted({k for g in groups.values() for r in g for k in r if "@" in k},
                   key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    if not names:
        return []
    order = ORDER + list(ABLATIONS)
    lines = ["", "Ranking the whole catalogue for every test user (items with a training row for the user left out):",
             "", "| model | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for variant in sorted(groups, key=lambda v: order.index(v) if v in order else 99):
        g = [r for r in groups[variant] if names[0] in r]
        if g:
            lines.append(f"| {variant} | {len(g)} | " + " | ".join(mean_std([r.get(k) for r in g]) for k in names) + " |")
    return lines


def plot_ablation(rows, out):
    variants = ["inttower"] + list(ABLATIONS)
    protocols = sorted({r["protocol"] for r in rows if r["variant"] in ABLATIONS})
    if not protocols:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        values = [[r["test_auc"] for r in rows if r["variant"] == v and r["protocol"] == protocol] for v in variants]
        keep = [i for i, v in enumerate(values) if v]
        means = [statistics.mean(values[i]) for i in keep]
        errors = [statistics.stdev(values[i]) if len(values[i]) > 1 else 0 for i in keep]
        labels = ["IntTower" if variants[i] == "inttower" else variants[i] for i in keep]
        ax.bar(range(len(keep)), means, yerr=errors, capsize=3,
               color=["#c0392b"] + ["#7f8c8d"] * (len(keep) - 1))
        ax.set_xticks(range(len(keep)), labels, rotation=30, ha="right", fontsize=8)
        low = min(m - e for m, e in zip(means, errors))
        ax.set_ylim(low - 0.01, max(m + e for m, e in zip(means, errors)) + 0.005)
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"IntTower ablation, ML-1M, protocol {protocol}")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    say(f"written {out / 'ablation.png'}")


def main():
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--models", default="inttower,two_tower")
    own.add_argument("--ablations", nargs="?", const="all", default="",
                     help="all (no value), or some of them by name, comma separated (e.g. 'w/o CIR')")
    own.add_argument("--seeds", default="1,2,3")
    own.add_argument("--protocols", default="paper,temporal")
    own.add_argument("--paper_data")
    own.add_argument("--random_data")
    own.add_argument("--temporal_data")
    own.add_argument("--results", default="results")
    own.add_argument("--report", action="store_true", help="only rebuild the tables")
    own.add_argument("--no_latency", action="store_true")
    own.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                     help="a config key and the values to try per model (repeatable: the grid of all)")
    own.add_argument("--tune_lr", default="", help="learning rates to try per model (--tune lr=...)")
    own.add_argument("--tune_protocol", default="temporal")
    args, rest = own.parse_known_args()
    if "--help" in rest or "-h" in rest:
        print(__doc__)
        return
    parse_args(rest, prog="run_experiments.py")  # reject unknown or ill-typed train.py options early
    out = Path(args.results)
    if not args.report:
        args.done = {}
        run_all(with_settings(plan(args), tune(args, rest, out)), rest, out, args.done)
    report(out, latency=not args.no_latency)


if __name__ == "__main__":
    run_cli(main)
