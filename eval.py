"""Evaluate a trained model on the test split: AUC, logloss, GAUC, rows, positive rate.

    python eval.py --run_dir runs/RUN                      # the run's best checkpoint, the run's data
    python eval.py --checkpoint runs/RUN/last.ckpt         # another checkpoint of a run
    python eval.py --run_dir runs/RUN --data_path other/ml-1m   # same protocol, other files
    python eval.py --run_dir runs/RUN --ranking_ks 10,50,200    # also Recall@K, NDCG@K over the catalogue

The model is rebuilt from the run's config.json and data_meta.json; the data set is prepared as
the run's config says (data keys may be overridden). Prints a table and writes <run_dir>/eval.json.
"""
# util first: it makes Ctrl-C during the imports below one line, not a traceback
from util import run_cli, say, write_json

from get_dataset import load_dataset
from model_config import parse_args
from runtime import check_same_features, evaluate, load_model, ranking_metrics, trained_run


def evaluate_run(cfg, overrides=frozenset()):
    run_dir, checkpoint, run_cfg, trained_meta = trained_run(cfg, overrides)
    data = load_dataset(run_cfg)
    check_same_features(trained_meta, data.meta)
    model = load_model(trained_meta, run_cfg, checkpoint)
    from model import check_inputs
    test = data.arrays("test")
    check_inputs(trained_meta, test)
    result = evaluate(model, test, trained_meta["inputs"], run_cfg.eval_batch_size, with_gauc=True)
    if cfg.ranking_ks:
        result.update(ranking_metrics(model, data, trained_meta["inputs"], run_cfg.eval_batch_size, cfg.ranking_ks))
    report = {"checkpoint": str(checkpoint), "model": run_cfg.model, "dataset": data.meta["dataset"],
              "synthetic": data.meta["synthetic"], "protocol": data.meta["protocol"], "leaky": data.meta["leaky"],
              "split": "test", **result}
    write_json(run_dir / "eval.json", report)
    rows = [("model", run_cfg.model), ("checkpoint", str(checkpoint)), ("data", f"{report['dataset']}{' (SYNTHETIC)' if report['synthetic'] else ''}"),
            ("protocol", report["protocol"] + (" (LEAKY: features use the labels)" if report["leaky"] else "")),
            ("rows", f"{result['rows']:,}"), ("positive rate", f"{result['positive_rate']:.4f}"),
            ("AUC", f"{result['auc']:.4f}"), ("logloss", f"{result['logloss']:.4f}"), ("GAUC", f"{result['gauc']:.4f}")]
    rows += [(name, f"{value:.4f}") for name, value in result.items() if "@" in name]
    width = max(len(k) for k, _ in rows)
    say("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    say(f"written {run_dir / 'eval.json'}")
    return report


def main():
    cfg, overrides = parse_args(prog="eval.py", description=__doc__.split("\n\n")[0], roles=("source", "run"))
    evaluate_run(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
