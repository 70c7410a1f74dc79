"""Every default of the project, and the `--key value` parser that all commands share.

get_dataset.py, train.py, eval.py, export.py, infer.py and run_experiments.py read the same
`Config`: a key means the same thing everywhere, unknown keys and ill-typed values are rejected
with one clear line, and every run saves the resolved config beside its results. Every key has
one role (ROLES): what eval.py, export.py and --resume may change on a saved run, what a sweep
ignores when it compares runs and what the data cache depends on are all derived from the roles.
MODELS is the one model registry.

Model defaults are those of the published MindSpore IntTower (batch 2048, lr 5e-4, dropout 0.1,
MLP 300-300-128, 4 heads x 64, embedding 32).
"""
import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field

DATASETS = ("auto", "ml-1m", "ml-100k", "synthetic", "amazon", "alibaba", "amazon-synthetic", "alibaba-synthetic")
PROTOCOLS = ("auto", "paper", "random", "temporal")


@dataclass(frozen=True)
class ModelSpec:
    cls: str                  # the class in model.py
    preset: dict              # the config changes the name stands for (two_tower: IntTower with every addition off)
    paper_auc: float = None   # ML-1M test AUC in the paper's Table 2


# The one model registry, in the order of the results tables (pre-ranking models, then ranking models).
MODELS = {
    "lr": ModelSpec("LR", {}),
    "two_tower": ModelSpec("IntTower", {"se": "none", "interaction": "dot", "cir_weight": 0.0}, 0.8697),
    # DSSM-style: unit-length tower outputs with linear last layers, cosine times a learned scale
    "dssm": ModelSpec("IntTower", {"se": "none", "interaction": "cosine", "cir_weight": 0.0, "linear_output": True}),
    "dat": ModelSpec("DAT", {}, 0.8712),
    "cold": ModelSpec("COLD", {}, 0.8836),
    "inttower": ModelSpec("IntTower", {}, 0.8974),
    "wide_deep": ModelSpec("WideDeep", {}, 0.8820),
    "deepfm": ModelSpec("DeepFM", {}, 0.8920),
    "dcn": ModelSpec("DCN", {}, 0.8964),
    "autoint": ModelSpec("AutoInt", {}, 0.8948),
}
SE_TYPES = ("lightse", "senet", "none")
INTERACTIONS = ("fe", "dot", "cosine", "fc")
FE_LAYERS = ("outputs", "inputs", "all")
DEVICES = ("CPU", "GPU", "Ascend")


# Every key has one role; the commands derive from the roles which keys they may change on a saved run.
ROLES = {
    "source": "where the data files are (eval.py may point a trained model at other files)",
    "data": "how the data is prepared (part of the cache key; fixed for a trained model)",
    "model": "the architecture and its losses (fixed for a trained model)",
    "train": "the optimisation (fixed for a trained model)",
    "budget": "when training stops (may change when a run is resumed)",
    "run": "where and how a command runs; never changes a result",
}


# What runs saved before a key existed were trained with, where today's default differs
BEFORE_THE_KEY = {"dropout_masks": "kernel", "batch_norm_kernel": "ops", "maxsim_kernel": "ops"}


def _opt(default, help, role, choices=None):
    assert role in ROLES, role
    return field(default=default, metadata={"help": help, "choices": choices, "role": role})


@dataclass
class Config:
    # ---- data (get_dataset.py)
    dataset: str = _opt("auto", "ml-1m, ml-100k, synthetic, amazon, alibaba (their generated samples: "
                                "amazon-synthetic, alibaba-synthetic), or auto: ML-1M when its files are found, "
                                "else the generated sample (said so in the log)", "source", DATASETS)
    data_path: str = _opt("", "an extracted MovieLens folder, its zip, or a ratings file with users/movies "
                              "files beside it; empty: <data_dir>/<dataset>", "source")
    data_dir: str = _opt("data", "where downloads, the generated sample and the preprocessed cache live", "source")
    download: bool = _opt(False, "download the GroupLens archive (checked against its published md5)", "source")
    download_url: str = _opt("", "base URL of the archive and its .md5 (a mirror); default: GroupLens", "source")
    synthetic_users: int = _opt(3000, "generated sample: number of users", "source")
    synthetic_items: int = _opt(1000, "generated sample: number of movies", "source")
    synthetic_ratings: int = _opt(50, "generated sample: mean number of ratings per user", "source")
    synthetic_seed: int = _opt(2022, "generated sample: seed of the generator (the data, not the split)", "source")
    schema: str = _opt("", "a schema file (TOML) describing your own interaction logs (data/README.md); its data "
                           "is --data_path (default <data_dir>/<schema name>); replaces --dataset", "source")
    protocol: str = _opt("auto", "paper (published, leaks labels into features), random (same split, "
                                 "leak-free), temporal (80/10/10 by time, leak-free); auto: temporal "
                                 "when timestamps exist, else random", "data", PROTOCOLS)
    temporal_val: str = _opt("period", "protocol temporal: the validation split. period: the tenth of the rows before the "
                                       "test period (mostly users new in that period); like_test: that period's rows "
                                       "of returning users plus a seeded sample of its new users, with the test "
                                       "split's share of rows from users training has not seen (docs/design.md); a "
                                       "schema's day split (Alibaba) keeps its own validation",
                             "data", ("period", "like_test"))
    label_threshold: int = _opt(3, "label = rating > label_threshold", "data")
    drop_neutral: bool = _opt(True, "drop ratings equal to label_threshold (as the paper does)", "data")
    zip_prefix: int = _opt(0, "add the first N characters of the zip code as a user field (0: off)", "data")
    mean_prior: float = _opt(10.0, "leak-free protocols: mean-rating features are smoothed towards the "
                                   "training positive rate with this many pseudo-ratings", "data")
    seed: int = _opt(2022, "seed of the split, the initialisation and the data order", "data")
    hash_buckets: int = _opt(0, "hash every categorical field with more distinct values than N into N buckets, "
                                "bounding its embedding table (0: off; a schema's own hash_buckets still apply)",
                             "data")
    # ---- model (model.py)
    model: str = _opt("inttower", "which model to train", "model", tuple(MODELS))
    se: str = _opt("lightse", "field attention over each tower's embeddings", "model", SE_TYPES)
    interaction: str = _opt("fe", "fe: FE-Block MaxSim; dot: plain two-tower; cosine: DSSM's cosine times a learned "
                                  "scale; fc: an MLP over both towers (couples them)", "model", INTERACTIONS)
    fe_layers: str = _opt("outputs", "user representations the FE-Block projects: outputs (every MLP layer's "
                                     "output), inputs (every MLP layer's input: the field embeddings and every "
                                     "hidden layer but the last, as the published code), all (both)", "model",
                          FE_LAYERS)
    fe_mean: bool = _opt(True, "FE-Block score as a mean over the L*H user heads instead of the paper's sum: the "
                               "same family of scores, with initial logits that do not grow with L*H (false: sum)",
                         "model")
    last_layer_only: bool = _opt(False, "FE-Block on the last of those representations only (the accelerated "
                                        "variant; export.py may also apply it to a trained model)", "model")
    embed_dim: int = _opt(32, "embedding size of every sparse field", "model")
    mlp: tuple = _opt((300, 300, 128), "hidden sizes of each tower's MLP, comma separated", "model")
    heads: int = _opt(4, "FE-Block heads per layer", "model")
    head_dim: int = _opt(64, "FE-Block dimensions per head", "model")
    dropout: float = _opt(0.1, "dropout probability after every MLP layer", "model")
    batch_norm: bool = _opt(True, "BatchNorm after every Dense layer of the MLPs", "model")
    linear_output: bool = _opt(True, "the towers' last layer (the vector that is dotted or projected into heads) "
                                     "without ReLU and Dropout, so it can take either sign (false: every layer "
                                     "Dense-BN-ReLU-Dropout, as the published code and this project until "
                                     "2026-12-02)", "model")
    output_batch_norm: bool = _opt(True, "with --linear_output: BatchNorm on the last layer (false: Dense with a "
                                         "bias only)", "model")
    cosine_scale: float = _opt(5.0, "interaction cosine: the initial value of the learned scale of the cosine "
                                     "(an inverse temperature)", "model")
    cir_weight: float = _opt(0.1, "weight of the contrastive CIR loss (0: off)", "model")
    cir_tau: float = _opt(0.2, "temperature of the CIR loss", "model")
    cir_anchors: int = _opt(512, "CIR: the first N rows of a batch are anchors against all its items (0: all rows)",
                            "model")
    cir_mask_same_item: bool = _opt(False, "CIR: leave out of an anchor's softmax the in-batch rows of its own item "
                                           "(false: they count as negatives, as in the published code)", "model")
    cir_logq: bool = _opt(False, "CIR: subtract from each in-batch item's logit the log of its share of the training "
                                 "rows (log-Q correction: in-batch negatives are drawn by popularity)", "model")
    dat_weight: float = _opt(0.5, "DAT: weight of the adaptive-mimic loss", "model")
    cross_layers: int = _opt(3, "DCN: number of cross layers", "model")
    attention_layers: int = _opt(3, "AutoInt: number of self-attention layers", "model")
    attention_heads: int = _opt(2, "AutoInt: heads per self-attention layer", "model")
    # ---- training (train.py)
    batch_size: int = _opt(2048, "training batch size (the last incomplete batch of an epoch is dropped)", "train")
    lr: float = _opt(5e-4, "Adam learning rate", "train")
    dropout_masks: str = _opt("pool", "where dropout masks come from. pool: each row takes a random row of a fixed "
                                      "pool of 8,192 masks drawn once (seeded, cheaper on CPU); kernel: nn.Dropout, a "
                                      "fresh random number per element (not seedable here; the results tables up to "
                                      "2026-12-06)", "train", ("pool", "kernel"))
    batch_norm_kernel: str = _opt("fused", "how BatchNorm trains. fused: BatchNorm and the ReLU after it as one C++ "
                                           "kernel forward and one backward (batch_norm.cc, built with g++ at start; CPU "
                                           "only: ops elsewhere or without a compiler); ops: MindSpore ops (the results "
                                           "tables up to 2026-12-07)", "train", ("fused", "ops"))
    maxsim_kernel: str = _opt("fused", "how the FE-Block's score trains. fused: the head biases, products and maxima "
                                       "as one C++ kernel forward and one backward (maxsim.cc, built with g++ at start; "
                                       "CPU only, up to 4 user layers: ops otherwise); ops: MindSpore ops (every run "
                                       "before it: results/ up to batch-norm-kernel)", "train", ("fused", "ops"))
    weight_decay: float = _opt(0.0, "Adam weight decay", "train")
    distribute: bool = _opt(False, "data-parallel training (set automatically when launched by msrun)", "train")
    epochs: int = _opt(10, "maximum number of epochs", "budget")
    patience: int = _opt(2, "stop after this many epochs without a better validation AUC", "budget")
    max_steps: int = _opt(0, "stop after this many training steps in total (0: no limit; for tests)", "budget")
    # ---- where and how a command runs
    device_target: str = _opt("CPU", "where MindSpore runs", "run", DEVICES)
    eval_batch_size: int = _opt(16384, "batch size for validation, test and export", "run")
    output_dir: str = _opt("runs", "parent folder of new run directories (export.py: the export folder)", "run")
    run_dir: str = _opt("", "the run directory (train: empty means <output_dir>/<time>-<model>; eval/export: "
                            "the run to read)", "run")
    resume: str = _opt("", "train: continue the run in this directory from its last checkpoint", "run")
    checkpoint: str = _opt("", "eval/export: a checkpoint file (default: the run's best checkpoint)", "run")
    ranking_ks: tuple = _opt((), "train.py (its test) and eval.py: also rank the whole catalogue for every test user "
                                 "(items without a training row for the user) and report Recall@K and NDCG@K at "
                                 "these K, e.g. 10,50,200 (empty: off)", "run")

    def validate(self):
        positive = ("embed_dim", "heads", "head_dim", "epochs", "batch_size", "eval_batch_size",
                    "synthetic_users", "synthetic_items", "synthetic_ratings", "cross_layers",
                    "attention_layers", "attention_heads")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        for key in ("patience", "zip_prefix", "hash_buckets", "max_steps", "cir_weight", "cir_anchors", "weight_decay", "mean_prior",
                    "dat_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        for key in ("lr", "cir_tau", "cosine_scale"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key} must be positive, got {getattr(self, key)}")
        if self.ranking_ks and min(self.ranking_ks) <= 0:
            raise ValueError(f"--ranking_ks needs positive K, got {self.ranking_ks}")
        if not self.mlp or min(self.mlp) <= 0:
            raise ValueError(f"--mlp needs positive layer sizes, got {self.mlp}")
        if not 1 <= self.label_threshold <= 5:
            raise ValueError(f"--label_threshold must be a rating 1-5, got {self.label_threshold}")
        return self

    def for_model(self):
        """The config the --model name stands for (its registry preset applied)."""
        return self.replace(**MODELS[self.model].preset)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def changed(self):
        """The keys whose values differ from the defaults, as in to_dict()."""
        default = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default[k]}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def from_dict(cls, values):
        """A config saved by an earlier run (unknown keys of other versions are ignored; a key it predates takes
        the value runs had before the key existed, where that differs from today's default)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if known[k].type is tuple else v
                  for k, v in {**BEFORE_THE_KEY, **values}.items() if k in known}
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


def keys_of(*roles):
    """The Config keys whose role is one of `roles`."""
    unknown = set(roles) - set(ROLES)
    assert not unknown, unknown
    return {f.name for f in dataclasses.fields(Config) if f.metadata["role"] in roles}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of the whole usage text."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog, description="", keys=None):
    parser = Parser(prog=prog, description=description, usage="%(prog)s [--key value ...]")
    for f in dataclasses.fields(Config):
        if keys is not None and f.name not in keys:
            continue
        kind = {bool: _to_bool, tuple: _to_ints}.get(f.type, f.type)
        extra = {"nargs": "?", "const": True} if kind is _to_bool else {}
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata["choices"],
                            help=f"{f.metadata['help']} (default: {_show(f.default)})", **extra)
    return parser


def parse_args(argv=None, prog=None, description="", base=None, roles=None, extra=()):
    """Config from `--key value` pairs (over `base` or the defaults); exits with one line on misuse.

    `roles` (and `extra` keys) limit the options to those a command reading a trained run may change
    (eval.py, export.py): the others are fixed by the run's config.json and not offered."""
    argv = sys.argv[1:] if argv is None else list(argv)
    accepted = None if roles is None else keys_of(*roles) | set(extra)
    parser = build_parser(prog or sys.argv[0], description, accepted)
    every = {f"--{f.name}" for f in dataclasses.fields(Config)}
    keys = every if accepted is None else {f"--{k}" for k in accepted}
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in every - keys:
            parser.error(f"{name} is fixed by the trained run (its config.json): {parser.prog} takes only "
                         f"where the data is and how it runs (see --help)")
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
