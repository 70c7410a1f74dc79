"""Export a trained model for serving: MINDIR of the full model and of each tower, and the item index.

    python export.py --run_dir runs/RUN                    # writes runs/RUN/export/
    python export.py --run_dir runs/RUN --output_dir serving/ --last_layer_only

Files written (see README, "Export and serving"):
  model.mindir        all input arrays -> click probability (B,)        (what the published export gives)
  user_tower.mindir   user arrays -> the user's representation (B, L, H, p) for FE (B, d for dot)
  item_tower.mindir   item arrays -> the item's representation (B, H, p) for FE (B, d for dot)
  *.onnx              the same as ONNX, with a fixed batch (model 256, user tower 1, item tower 256):
                      MindSpore's ONNX exporter does not support dynamic shapes
  item_index.npy      float32 (N + 1, H, p): every movie of the catalogue, then the out-of-vocabulary item
  item_ids.npy        int64 (N,): the MovieLens id of each index row; titles.json: their titles
  users.npz, vocab.npz  the user feature table and vocabularies, to build a user's inputs
  manifest.json       config, shapes, score bias, checksums of every file (infer.py checks them)

--last_layer_only on a run trained with every user layer exports the accelerated variant of the
published README: only the last user layer's heads are kept, so scores differ from the trained
model (the manifest says so); train with --last_layer_only to serve exactly what was trained.
"""
import json
import shutil
import time
from pathlib import Path

# util first: it makes Ctrl-C during the imports below one line, not a traceback
from util import UserError, md5_bytes, md5_file, run_cli, say, write_json

import numpy as np

from get_dataset import dense_fills, load_dataset, tower_inputs, unknown_inputs
from model_config import parse_args
from runtime import load_checkpoint, load_model, trained_run

ONNX_BATCH = {"model": 256, "user_tower": 1, "item_tower": 256}  # ONNX graphs have a fixed batch


def tower_cells(model):
    """Cells with plain construct() for each exported graph (inputs: the tower's arrays)."""
    import mindspore as ms
    from mindspore import nn, ops

    class Probability(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, *inputs):
            return ops.sigmoid(self.net(*inputs))

    class UserTower(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def construct(self, *inputs):
            return self.net.user_representation(*inputs)

    class ItemTower(UserTower):
        def construct(self, *inputs):
            return self.net.item_representation(*inputs)

    return {"model": Probability(model), "user_tower": UserTower(model), "item_tower": ItemTower(model)}, ms


def example_inputs(names, arrays):
    """Dynamic-batch placeholders: the batch axis is None in the exported graphs."""
    import mindspore as ms
    return [ms.Tensor(shape=[None, *arrays[k].shape[1:]], dtype=ms.int32 if arrays[k].dtype.kind == "i"
                      else ms.float32) for k in names]


def trained_model(cfg, overrides):
    """The run's model with its checkpoint loaded, reduced to its last user layer if --last_layer_only asks;
    returns (model, run directory, checkpoint, run config, data meta, truncated)."""
    # --last_layer_only is export's own option (applied to the trained model below), not a change of the run
    run_dir, checkpoint, run_cfg, meta = trained_run(cfg, set(overrides) - {"last_layer_only"})
    model = load_model(meta, run_cfg)
    if not model.decoupled:
        raise UserError(f"model {run_cfg.model} couples user and item features: only decoupled models "
                        f"(inttower with interaction fe or dot, two_tower, dat) have towers and an item index")
    load_checkpoint(model, checkpoint)
    truncated = "last_layer_only" in overrides and cfg.last_layer_only and not run_cfg.for_model().last_layer_only
    if truncated:
        if model.scoring != "maxsim":
            raise UserError("--last_layer_only applies to the FE-Block interaction only")
        model.fe.keep_last_layer_only()
        say("WARNING: exporting the last user layer only (accelerated variant): scores differ from the trained "
            "model; train with --last_layer_only to serve exactly what was trained")
    model.set_train(False)
    return model, run_dir, checkpoint, run_cfg, meta, truncated


def item_index(model, items, meta, batch_size):
    """float32 (N + 1, ...) item representations: every catalogue item through the item tower, then the
    unknown (out-of-vocabulary) item."""
    import mindspore as ms
    names = tower_inputs(meta["towers"], "item")
    unknown = unknown_inputs(meta["towers"], "item", meta["positive_rate"]["train"], dense_fills(meta))
    inputs = {k: np.concatenate([items[k], unknown[k]]) for k in names}
    index = [model.item_representation(*[ms.Tensor(inputs[k][start:start + batch_size]) for k in names]).asnumpy()
             for start in range(0, len(inputs[names[0]]), batch_size)]
    return np.ascontiguousarray(np.concatenate(index).astype(np.float32))


def export_graphs(model, folder, arrays, meta):
    """MINDIR (dynamic batch) and ONNX (fixed batch) of the full model and of each tower; returns the
    formats written per graph (and the reason, where the ONNX exporter failed)."""
    cells, ms = tower_cells(model)
    user, item = tower_inputs(meta["towers"], "user"), tower_inputs(meta["towers"], "item")
    formats = {}
    for name, inputs in (("model", user + item), ("user_tower", user), ("item_tower", item)):
        ms.export(cells[name], *example_inputs(inputs, arrays), file_name=str(folder / name), file_format="MINDIR")
        formats[name] = ["MINDIR"]
        # MindSpore's ONNX exporter needs static shapes: a fixed batch per graph (see the manifest)
        batch = ONNX_BATCH[name]
        fixed = [ms.Tensor(np.resize(arrays[k], (batch, *arrays[k].shape[1:]))) for k in inputs]
        try:
            ms.onnx.export(cells[name], *fixed, file_name=str(folder / f"{name}.onnx"))
            formats[name].append("ONNX")
        except Exception as e:  # an operator the exporter does not know
            formats[name + "_onnx_error"] = str(e).strip().splitlines()[0][:200]
            (folder / f"{name}.onnx").unlink(missing_ok=True)
    return formats


def check_round_trip(model, folder, users, items, meta, pairs=64):
    """The files in `folder` reproduce the trained model on `pairs` (user, item) pairs of the catalogue:
    model.mindir's probabilities and the scorer's index scores equal the model's (else UserError, and the
    previous export is kept)."""
    import mindspore as ms
    from mindspore import nn
    from scorer import Scorer
    u, i = np.arange(pairs) % len(users["key"]), (np.arange(pairs) * 7) % len(items["key"])
    inputs = [ms.Tensor(users[k][u]) for k in tower_inputs(meta["towers"], "user")] + \
             [ms.Tensor(items[k][i]) for k in tower_inputs(meta["towers"], "item")]
    logits = model(*inputs).asnumpy()
    probs = nn.GraphCell(ms.load(str(folder / "model.mindir")))(*inputs).asnumpy()
    scorer = Scorer(folder)
    scores = np.array([scorer.scores(scorer.user_vector(int(users["key"][a]))[0], np.array([b]))[0]
                       for a, b in zip(u, i)])
    for what, got, want in (("model.mindir", probs, 1 / (1 + np.exp(-logits))), ("the item index", scores, logits)):
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise UserError(f"the export does not reproduce the trained model ({what}: largest difference "
                            f"{np.abs(got - want).max():.2e}); the previous export, if any, is kept")


def export_run(cfg, overrides=frozenset()):
    """Write the export folder (default RUN/export) under a temporary name; it replaces the old one only
    once every file is written and the round trip (check_round_trip) reproduces the model."""
    import mindspore as ms
    model, run_dir, checkpoint, run_cfg, meta, truncated = trained_model(cfg, overrides)
    out = Path(cfg.output_dir) if "output_dir" in overrides else run_dir / "export"
    data = load_dataset(run_cfg, quiet=True)
    users, items = data.arrays("users"), data.arrays("items")
    index = item_index(model, items, meta, run_cfg.eval_batch_size)
    user_inputs, item_inputs = tower_inputs(meta["towers"], "user"), tower_inputs(meta["towers"], "item")
    tmp = out.with_name(f".{out.name}.tmp-{int(time.time())}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        formats = export_graphs(model, tmp, {**users, **items}, meta)
        np.save(tmp / "item_index.npy", index)
        np.save(tmp / "item_ids.npy", items["key"].astype(np.int64))
        if "name" in items:  # data sets with text ids: the raw id of each index row
            np.save(tmp / "item_names.npy", items["name"].astype(str))
        np.savez(tmp / "users.npz", **users)
        np.savez(tmp / "vocab.npz", **data.arrays("vocab"))
        (tmp / "titles.json").write_text(json.dumps([str(t) for t in items["title"]]))
        user_shape = list(model.user_representation(*[ms.Tensor(users[k][:1]) for k in user_inputs]).shape[1:])
        manifest = {
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(run_dir), "checkpoint": str(checkpoint),
            "checkpoint_md5": md5_file(checkpoint), "model": run_cfg.model, "config": run_cfg.to_dict(),
            "scoring": model.scoring, "last_layer_only": bool(run_cfg.for_model().last_layer_only or truncated),
            "truncated_to_last_layer": bool(truncated),
            "score_bias": float(model.bias.asnumpy()), "prior": meta["positive_rate"]["train"],
            "dense_fills": dense_fills(meta),
            "user_shape": user_shape,
            "item_shape": list(index.shape[1:]), "items": int(len(items["key"])), "oov_row": int(len(items["key"])),
            "dataset": meta["dataset"], "protocol": meta["protocol"], "towers": meta["towers"], "inputs": meta["inputs"],
            "user_inputs": user_inputs, "item_inputs": item_inputs, "formats": formats, "onnx_batch": ONNX_BATCH,
            "vocab_md5": md5_bytes((tmp / "vocab.npz").read_bytes()),
            "files": {p.name: md5_file(p) for p in sorted(tmp.iterdir())},
        }
        write_json(tmp / "manifest.json", manifest)
        check_round_trip(model, tmp, users, items, meta)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    graphs = ", ".join(f"{k} ({'/'.join(v)})" for k, v in formats.items() if not k.endswith("error"))
    say(f"exported {run_cfg.model} to {out}: {graphs}; item index {index.shape} float32 "
        f"({index[0].nbytes:,} bytes per item)")
    return out


def main():
    cfg, overrides = parse_args(prog="export.py", description=__doc__.split("\n\n")[0], roles=("source", "run"),
                                extra=("last_layer_only",))
    export_run(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
