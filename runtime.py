"""The run code every command shares: MindSpore start-up, batch feeding, prediction and evaluation,
the train step, checkpoints, and restoring a saved run's configuration.

Layering: building blocks (util, model_config, get_dataset, module, model, scorer and this module)
never import a command; commands (train, eval, export, infer, benchmark, run_experiments) import
building blocks only, never another command.

MindSpore is imported inside the functions that need it, never at module level: importing it
costs 1-3 s and prints warnings, and get_dataset.py, `--help`, argument errors and
run_experiments.py's bookkeeping must stay fast and quiet without it.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from model_config import Config, keys_of
from util import UserError, atomic_write, auc, gauc, logloss, read_json, signals_mode


def import_mindspore():
    """`import mindspore`, with SIGINT/SIGTERM deferred: interrupted half-way, its C++ initialisation
    aborts the process with a fatal error instead of stopping cleanly."""
    with signals_mode("defer"):
        import mindspore as ms
    return ms


def init_mindspore(cfg):
    """GRAPH_MODE on cfg.device_target, seeds of MindSpore and NumPy set; returns the mindspore module."""
    ms = import_mindspore()
    from mindspore import log
    log._get_logger().addFilter(known_noise)  # MindSpore's logger (no public accessor); added once per process
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

def batches(arrays, names, batch_size, order=None, pad=False, numpy=False):
    """Yield tuples of Tensors (numpy arrays with `numpy`), one whole batch at a time, in `order` (default:
    as stored).

    Training drops the last incomplete batch (one compiled shape; a new order every epoch uses all
    rows over time); prediction pads it instead, and the caller drops the padding."""
    if numpy:
        convert = np.asarray
    else:
        import mindspore as ms
        convert = ms.Tensor
    n = len(arrays[names[0]])
    order = np.arange(n) if order is None else order
    stop = n if pad else n - n % batch_size
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if pad and len(idx) < batch_size:
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1] if len(idx) else 0)])
        yield tuple(convert(arrays[name][idx]) for name in names)


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
    """Whole-split AUC (never a mean of per-batch AUCs), logloss, rows, positive rate[, GAUC]."""
    probs = predict(model, arrays, names, batch_size)
    labels = arrays["label"]
    result = {"auc": auc(labels, probs), "logloss": logloss(labels, probs) if len(labels) else float("nan"),
              "rows": int(len(labels)), "positive_rate": float(labels.mean()) if len(labels) else float("nan")}
    if with_gauc:
        result["gauc"] = gauc(arrays["user_key"], labels, probs)
    return result


def ranking_metrics(model, data, names, batch_size, ks=(10, 50, 200)):
    """Pre-ranking's own job, offline: for every test user with a positive, score every catalogue item
    (data's items table) that the user has no training row for, rank them, and average over users
    Recall@K (the share of the user's test positives in the top K) and NDCG@K (binary gains). Every model
    scores (user, item) pairs through its full graph, so decoupled and coupled models are ranked alike."""
    from tqdm import tqdm
    users, items, train, test = (data.arrays(name) for name in ("users", "items", "train", "test"))
    n_items, top = len(items["key"]), max(ks)
    item_order, user_order = np.argsort(items["key"]), np.argsort(users["key"])

    def rows(order, keys, wanted):
        return order[np.searchsorted(keys, wanted, sorter=order)]
    positive = test["label"] > 0.5
    pos_user, pos_item = test["user_key"][positive], rows(item_order, items["key"], test["item_key"][positive])
    ranked_users = np.unique(pos_user)
    seen = {}
    for u, i in zip(train["user_key"], rows(item_order, items["key"], train["item_key"])):
        seen.setdefault(int(u), []).append(i)
    truth = {}
    for u, i in zip(pos_user, pos_item):
        truth.setdefault(int(u), set()).add(int(i))
    discounts = 1.0 / np.log2(np.arange(2, top + 2))
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in ks}
    chunk = max(1, 4 * batch_size // n_items)  # users scored per call: about four batches of pairs
    for start in tqdm(range(0, len(ranked_users), chunk), desc="ranking the catalogue", unit="chunk", leave=False):
        keys = ranked_users[start:start + chunk]
        u_rows = np.repeat(rows(user_order, users["key"], keys), n_items)
        i_rows = np.tile(np.arange(n_items), len(keys))
        pairs = {k: (users[k][u_rows] if k.startswith("user_") else items[k][i_rows]) for k in names}
        scores = predict(model, pairs, names, batch_size).reshape(len(keys), n_items)
        for key, s in zip(keys, scores):
            s[seen.get(int(key), [])] = -np.inf
            best = np.argpartition(-s, top - 1)[:top] if top < n_items else np.arange(n_items)
            best = best[np.argsort(-s[best], kind="stable")][:top]
            wanted = truth[int(key)]
            hits = np.fromiter((int(i) in wanted for i in best), bool, len(best))
            for k in ks:
                sums[f"recall@{k}"] += hits[:k].sum() / len(wanted)
                sums[f"ndcg@{k}"] += (hits[:k] * discounts[:len(hits[:k])]).sum() / discounts[:min(len(wanted), k)].sum()
    n = max(len(ranked_users), 1)
    return {"users_ranked": int(len(ranked_users)), "catalogue": int(n_items),
            **{name: value / n for name, value in sums.items()}}


# ---------------------------------------------------------------- the train step

def train_step(model, cfg):
    """The compiled train step: BCE + the model's auxiliary loss, Adam, nn.TrainOneStepCell (GRAPH_MODE).

    Under msrun's DATA_PARALLEL context TrainOneStepCell inserts the gradient all-reduce."""
    from mindspore import nn
    from model import LossCell
    optimizer = nn.Adam(model.trainable_params(), learning_rate=cfg.lr, weight_decay=cfg.weight_decay)
    return nn.TrainOneStepCell(LossCell(model), optimizer)


# Deprecation warnings of MindSpore 2.10 that are noise at every start, and only these (exact phrases):
QUIET_WARNINGS = (
    "FusedSparseAdam",  # nn.Adam always builds it for sparse gradients; our embeddings' are dense: it never runs
)


def known_noise(record):
    """A logging filter: False for MindSpore's warnings in QUIET_WARNINGS."""
    return not any(phrase in record.getMessage() for phrase in QUIET_WARNINGS)


# ---------------------------------------------------------------- checkpoints

def params_md5(named_params):
    """A checksum of parameters by name (a cell, or a dict name -> Parameter): equal on all ranks of a
    data-parallel job, and stored in every checkpoint to verify it when it is loaded."""
    if not isinstance(named_params, dict):
        named_params = dict(named_params.parameters_and_names())
    digest = hashlib.md5()
    for name in sorted(named_params):
        digest.update(name.encode())
        digest.update(named_params[name].asnumpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(cell, path, state=None):
    """Write a checkpoint atomically (MindSpore's save deletes the old file before writing), with a CRC of
    the file and the md5 of the parameter values inside it; SIGINT/SIGTERM wait until it is written."""
    ms = import_mindspore()
    params = [{"name": name, "data": p} for name, p in cell.parameters_and_names()]
    extra = {"params_md5": params_md5(cell)}
    if state is not None:
        extra["train_state"] = json.dumps(state)
    with signals_mode("defer"):
        atomic_write(path, lambda tmp: ms.save_checkpoint(params, tmp, append_dict=extra, format="ckpt",
                                                          crc_check=True))


def read_checkpoint(path):
    """(parameters by name, train state or None) of a checkpoint written by save_checkpoint, verified: a file
    that is truncated, not a checkpoint, or whose bytes changed since it was written is refused in one line."""
    ms = import_mindspore()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        stored = ms.load_checkpoint(str(path), crc_check=True)
    except (ValueError, RuntimeError, TypeError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable MindSpore checkpoint (truncated, corrupted or another "
                        f"file): {reason}") from None
    state, digest = stored.pop("train_state", None), stored.pop("params_md5", None)
    if digest is None:
        raise UserError(f"{path} has no checksum of its parameters (not written by this project's train.py, "
                        f"or by a version before checkpoints were verified): it cannot be verified")
    if params_md5(stored) != str(digest):
        raise UserError(f"{path} is corrupted: its parameters do not match the checksum written with them")
    return stored, json.loads(str(state)) if state is not None else None


# Parameters a checkpoint may lack: module.Dropout's position on its pool of masks, added in December 2026 (an older
# checkpoint goes on from the pool's start).
OPTIONAL_STATE = (".mask_offset",)


def load_checkpoint(cell, path):
    """Load a verified checkpoint (read_checkpoint) into `cell`, refusing missing, unexpected or mis-shaped
    parameters; returns the train state stored with it (or None)."""
    path = Path(path)
    stored, state = read_checkpoint(path)
    own = dict(cell.parameters_and_names())
    missing = sorted(name for name in set(own) - set(stored) if not name.endswith(OPTIONAL_STATE))
    unexpected = sorted(set(stored) - set(own))
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model ({len(missing)} parameters missing, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): was it saved "
                        f"with another --model or configuration?")
    for name, param in own.items():
        if name not in stored:
            continue  # OPTIONAL_STATE: keeps its initial value
        value = stored[name]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{path}: parameter {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(param.shape)}: vocabulary sizes or layer sizes differ from this data/config")
        param.set_data(value if value.dtype == param.dtype else value.astype(param.dtype))
    return state


# ---------------------------------------------------------------- saved runs

def restore_run(run_dir, cfg, overrides, roles):
    """The config a run in `run_dir` was trained with, where only keys of `roles` (model_config.ROLES)
    given on the command line (`overrides`) may differ: eval.py and export.py may change where the data
    is and how the command runs, --resume also the budget; the rest defines the trained model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json): pass the folder train.py wrote")
    saved = Config.from_dict(read_json(run_dir / "config.json", "run config"))
    allowed = keys_of(*roles)
    refused = sorted(k for k in set(overrides) - allowed if getattr(cfg, k) != getattr(saved, k))
    if refused:
        raise UserError(f"the configuration of a trained model comes from {run_dir / 'config.json'}; cannot change "
                        f"{', '.join(refused)} (only keys of the roles {', '.join(roles)})")
    return saved.replace(**{k: getattr(cfg, k) for k in set(overrides) & allowed})


def trained_run(cfg, overrides, roles=("source", "run")):
    """(run directory, checkpoint, run config, data meta of the run) for eval.py and export.py:
    --run_dir RUN (its best checkpoint) or --checkpoint FILE (its folder is the run)."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    elif cfg.checkpoint:
        run_dir = Path(cfg.checkpoint).parent
    else:
        raise UserError("say which model to use: --run_dir RUN or --checkpoint FILE")
    run_cfg = restore_run(run_dir, cfg, overrides, roles)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run_dir / "best.ckpt"
    return run_dir, checkpoint, run_cfg, read_json(run_dir / "data_meta.json", "run data metadata")


def load_model(meta, run_cfg, checkpoint=None):
    """The model a run trained, rebuilt from its data meta and config (MindSpore initialised for run_cfg's
    device), with `checkpoint` loaded if given."""
    init_mindspore(run_cfg)
    from model import build_model
    model = build_model(meta, run_cfg)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def check_same_features(trained, current):
    """The data must have the fields and vocabulary sizes the model was built with."""
    def sizes(meta):
        return {t: [(f["name"], f["vocab_size"]) for f in spec["sparse"] + spec["multi"]] + spec["dense"]
                for t, spec in meta["towers"].items()}
    if sizes(trained) != sizes(current):
        raise UserError(f"the model was trained on {trained['dataset']}/{trained['protocol']} with fields "
                        f"{sizes(trained)}; this data ({current['dataset']}/{current['protocol']}) has "
                        f"{sizes(current)}: vocabulary sizes differ, evaluate on the data it was trained on")
