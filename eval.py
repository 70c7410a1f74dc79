"""Evaluate a trained model on the test split: AUC, logloss, GAUC, rows, positive rate.

    python eval.py --run_dir runs/RUN                      # the run's best checkpoint, the run's data
    python eval.py --checkpoint runs/RUN/last.ckpt         # another checkpoint of a run
    python eval.py --run_dir runs/RUN --data_path other/ml-1m   # same protocol, other files

The model is rebuilt from the run's config.json and data_meta.json; the data set is prepared as
the run's config says (data keys may be overridden). Prints a table and writes <run_dir>/eval.json.
"""
from pathlib import Path

from get_dataset import load_dataset
from model_config import Config, parse_args
from util import UserError, read_json, run_cli, say, write_json

DATA_KEYS = {"dataset", "data_path", "data_dir", "download", "download_url", "device_target", "eval_batch_size",
             "run_dir", "checkpoint", "output_dir"}


def load_run(cfg, overrides):
    """(run directory, checkpoint path, run config with the allowed overrides, data meta of the run)."""
    if cfg.checkpoint and not cfg.run_dir:
        run_dir = Path(cfg.checkpoint).parent
    elif cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        raise UserError("say which model to evaluate: --run_dir RUN or --checkpoint FILE")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json): pass the folder train.py wrote")
    saved = Config.from_dict(read_json(run_dir / "config.json", "run config"))
    refused = sorted(k for k in set(overrides) - DATA_KEYS if getattr(cfg, k) != getattr(saved, k))
    if refused:
        raise UserError(f"the model's configuration comes from {run_dir}/config.json; cannot change {', '.join(refused)}")
    run_cfg = saved.replace(**{k: getattr(cfg, k) for k in set(overrides) & DATA_KEYS})
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run_dir / "best.ckpt"
    return run_dir, checkpoint, run_cfg, read_json(run_dir / "data_meta.json", "run data metadata")


def check_same_features(trained, current):
    """The data must have the fields and vocabulary sizes the model was built with."""
    def sizes(meta):
        return {t: [(f["name"], f["vocab_size"]) for f in spec["sparse"] + spec["multi"]] + spec["dense"]
                for t, spec in meta["towers"].items()}
    if sizes(trained) != sizes(current):
        raise UserError(f"the model was trained on {trained['dataset']}/{trained['protocol']} with fields "
                        f"{sizes(trained)}; this data ({current['dataset']}/{current['protocol']}) has "
                        f"{sizes(current)}: vocabulary sizes differ, evaluate on the data it was trained on")


def evaluate_run(cfg, overrides=frozenset()):
    from train import evaluate, init_mindspore, load_checkpoint
    run_dir, checkpoint, run_cfg, trained_meta = load_run(cfg, overrides)
    init_mindspore(run_cfg)
    from model import build_model, check_inputs
    data = load_dataset(run_cfg)
    check_same_features(trained_meta, data.meta)
    model = build_model(trained_meta, run_cfg)
    load_checkpoint(model, checkpoint)
    test = data.split("test")
    check_inputs(trained_meta, test)
    result = evaluate(model, test, trained_meta["inputs"], run_cfg.eval_batch_size, with_gauc=True)
    report = {"checkpoint": str(checkpoint), "model": run_cfg.model, "dataset": data.meta["dataset"],
              "synthetic": data.meta["synthetic"], "protocol": data.meta["protocol"], "leaky": data.meta["leaky"],
              "split": "test", **result}
    write_json(run_dir / "eval.json", report)
    rows = [("model", run_cfg.model), ("data", f"{report['dataset']}{' (SYNTHETIC)' if report['synthetic'] else ''}"),
            ("protocol", report["protocol"] + (" (LEAKY: features use the labels)" if report["leaky"] else "")),
            ("rows", f"{result['rows']:,}"), ("positive rate", f"{result['positive_rate']:.4f}"),
            ("AUC", f"{result['auc']:.4f}"), ("logloss", f"{result['logloss']:.4f}"), ("GAUC", f"{result['gauc']:.4f}")]
    width = max(len(k) for k, _ in rows)
    say("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    say(f"written {run_dir / 'eval.json'}")
    return report


def main():
    cfg, overrides = parse_args(prog="eval.py", description=__doc__.split("\n\n")[0])
    evaluate_run(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
