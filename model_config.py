"""Every default of the project, and the `--key value` parser that all commands share.

get_dataset.py, train.py, eval.py, export.py, infer.py and run_experiments.py read the same
`Config`: a key means the same thing everywhere, unknown keys and ill-typed values are rejected
with one clear line, and every run saves the resolved config beside its results.

Model defaults are those of the published MindSpore IntTower (batch 2048, lr 5e-4, dropout 0.1,
MLP 300-300-128, 4 heads x 64, embedding 32).
"""
import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field

DATASETS = ("auto", "ml-1m", "ml-100k", "synthetic")
PROTOCOLS = ("auto", "paper", "random", "temporal")
MODELS = ("inttower", "two_tower", "lr", "dat", "cold", "wide_deep", "deepfm", "dcn", "autoint")
SE_TYPES = ("lightse", "senet", "none")
INTERACTIONS = ("fe", "dot", "fc")
FE_LAYERS = ("outputs", "inputs", "all")
DEVICES = ("CPU", "GPU", "Ascend")


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # ---- data (get_dataset.py)
    dataset: str = _opt("auto", "ml-1m, ml-100k, synthetic, or auto: ML-1M when its files are found, "
                                "else the generated sample (said so in the log)", DATASETS)
    data_path: str = _opt("", "an extracted MovieLens folder, its zip, or a ratings file with users/movies "
                              "files beside it; empty: <data_dir>/<dataset>")
    data_dir: str = _opt("data", "where downloads, the generated sample and the preprocessed cache live")
    download: bool = _opt(False, "download the GroupLens archive (checked against its published md5)")
    download_url: str = _opt("", "base URL of the archive and its .md5 (a mirror); default: GroupLens")
    protocol: str = _opt("auto", "paper (published, leaks labels into features), random (same split, "
                                 "leak-free), temporal (80/10/10 by time, leak-free); auto: temporal "
                                 "when timestamps exist, else random", PROTOCOLS)
    label_threshold: int = _opt(3, "label = rating > label_threshold")
    drop_neutral: bool = _opt(True, "drop ratings equal to label_threshold (as the paper does)")
    zip_prefix: int = _opt(0, "add the first N characters of the zip code as a user field (0: off)")
    mean_prior: float = _opt(10.0, "leak-free protocols: mean-rating features are smoothed towards the "
                                   "training positive rate with this many pseudo-ratings")
    synthetic_users: int = _opt(3000, "generated sample: number of users")
    synthetic_items: int = _opt(1000, "generated sample: number of movies")
    synthetic_ratings: int = _opt(50, "generated sample: mean number of ratings per user")
    synthetic_seed: int = _opt(2022, "generated sample: seed of the generator (the data, not the split)")
    # ---- model (model.py)
    model: str = _opt("inttower", "which model to train", MODELS)
    se: str = _opt("lightse", "field attention over each tower's embeddings", SE_TYPES)
    interaction: str = _opt("fe", "fe: FE-Block MaxSim; dot: plain two-tower; fc: an MLP over both "
                                  "towers (couples them)", INTERACTIONS)
    fe_layers: str = _opt("outputs", "user representations the FE-Block projects: outputs (every MLP layer's "
                                     "output), inputs (every MLP layer's input: the field embeddings and every "
                                     "hidden layer but the last, as the published code), all (both)", FE_LAYERS)
    fe_mean: bool = _opt(True, "FE-Block score as a mean over the L*H user heads instead of the paper's sum: the "
                               "same family of scores, with initial logits that do not grow with L*H (false: sum)")
    last_layer_only: bool = _opt(False, "FE-Block on the last of those representations only (the accelerated variant)")
    embed_dim: int = _opt(32, "embedding size of every sparse field")
    mlp: tuple = _opt((300, 300, 128), "hidden sizes of each tower's MLP, comma separated")
    heads: int = _opt(4, "FE-Block heads per layer")
    head_dim: int = _opt(64, "FE-Block dimensions per head")
    dropout: float = _opt(0.1, "dropout probability after every MLP layer")
    batch_norm: bool = _opt(True, "BatchNorm after every Dense layer of the MLPs")
    cir_weight: float = _opt(0.1, "weight of the contrastive CIR loss (0: off)")
    cir_tau: float = _opt(0.2, "temperature of the CIR loss")
    cir_anchors: int = _opt(512, "CIR: the first N rows of a batch are anchors against all its items (0: all rows)")
    dat_weight: float = _opt(0.5, "DAT: weight of the adaptive-mimic loss")
    cross_layers: int = _opt(3, "DCN: number of cross layers")
    attention_layers: int = _opt(3, "AutoInt: number of self-attention layers")
    attention_heads: int = _opt(2, "AutoInt: heads per self-attention layer")
    # ---- training (train.py)
    epochs: int = _opt(10, "maximum number of epochs")
    batch_size: int = _opt(2048, "training batch size (the last incomplete batch of an epoch is dropped)")
    eval_batch_size: int = _opt(16384, "batch size for validation, test and export")
    lr: float = _opt(5e-4, "Adam learning rate")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    patience: int = _opt(2, "stop after this many epochs without a better validation AUC")
    seed: int = _opt(2022, "seed of the split, the initialisation and the data order")
    device_target: str = _opt("CPU", "where MindSpore runs", DEVICES)
    output_dir: str = _opt("runs", "parent folder of new run directories")
    run_dir: str = _opt("", "the run directory (train: empty means <output_dir>/<time>-<model>; eval/export: "
                            "the run to read)")
    resume: str = _opt("", "train: continue the run in this directory from its last checkpoint")
    checkpoint: str = _opt("", "eval/export: a checkpoint file (default: the run's best checkpoint)")
    max_steps: int = _opt(0, "stop after this many training steps in total (0: no limit; for tests)")
    distribute: bool = _opt(False, "data-parallel training (set automatically when launched by msrun)")

    def validate(self):
        positive = ("embed_dim", "heads", "head_dim", "epochs", "batch_size", "eval_batch_size",
                    "synthetic_users", "synthetic_items", "synthetic_ratings", "cross_layers",
                    "attention_layers", "attention_heads")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        for key in ("patience", "zip_prefix", "max_steps", "cir_weight", "cir_anchors", "weight_decay", "mean_prior",
                    "dat_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or self.cir_tau <= 0:
            raise ValueError("--lr and --cir_tau must be positive")
        if not self.mlp or min(self.mlp) <= 0:
            raise ValueError(f"--mlp needs positive layer sizes, got {self.mlp}")
        if not 1 <= self.label_threshold <= 5:
            raise ValueError(f"--label_threshold must be a rating 1-5, got {self.label_threshold}")
        return self

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_dict(cls, values):
        """A config saved by an earlier run (unknown keys of other versions are ignored)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if known[k].type is tuple else v
                  for k, v in values.items() if k in known}
        return cls(**kwargs).validate()

    def __str__(self):
        return json.dumps(self.to_dict(), indent=1)


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _to_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _to_ints(text):
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of the whole usage text."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog, description=""):
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     usage="%(prog)s [--key value ...]")
    for f in dataclasses.fields(Config):
        kind = {bool: _to_bool, tuple: _to_ints}.get(f.type, f.type)
        extra = {"nargs": "?", "const": True} if kind is _to_bool else {}
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata["choices"],
                            help=f"{f.metadata['help']} (default: {_show(f.default)})", **extra)
    return parser


def parse_args(argv=None, prog=None, description="", base=None):
    """Config from `--key value` pairs (over `base` or the defaults); exits with one line on misuse."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog or sys.argv[0], description)
    keys = {f"--{f.name}" for f in dataclasses.fields(Config)}
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in keys and name != "--help":
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"unknown option {name}{hint}")
    overrides = vars(parser.parse_args(argv))
    base = base or Config()
    try:
        return dataclasses.replace(base, **overrides).validate(), set(overrides)
    except ValueError as e:
        parser.error(str(e))
