"""IntTower, assembled from module.py's cells and the data set's meta.json.

Nothing here knows MovieLens: field names, vocabulary sizes and input arrays come from
`meta["towers"]` (written by get_dataset.py). A model takes the input arrays named by
`meta["inputs"]` (user arrays first, then item arrays) and returns click logits (B,).
"""
import mindspore as ms
from mindspore import nn, ops

from module import CIRLoss, FEBlock, MLP, count_params, field_attention
from util import UserError


class FeatureEmbedding(nn.Cell):
    """One tower's input arrays -> field embeddings (B, F, D) and dense values (B, n_dense).

    One table per sparse field; a multi-valued field (genres) is the masked mean of its ids'
    embeddings. Inputs, in order: sparse ids (B, n_sparse) if any, then ids (B, max_len) and
    mask (B, max_len) per multi-valued field, then dense values (B, n_dense) if any."""

    def __init__(self, spec, dim):
        super().__init__()
        self.n_sparse, self.n_multi, self.n_dense = len(spec["sparse"]), len(spec["multi"]), len(spec["dense"])
        self.sparse = nn.CellList([nn.Embedding(f["vocab_size"], dim) for f in spec["sparse"]])
        self.multi = nn.CellList([nn.Embedding(f["vocab_size"], dim) for f in spec["multi"]])
        self.n_fields = self.n_sparse + self.n_multi
        self.n_inputs = int(self.n_sparse > 0) + 2 * self.n_multi + int(self.n_dense > 0)

    def construct(self, *inputs):
        fields = ()
        if self.n_sparse:
            ids = inputs[0]
            for k in range(self.n_sparse):
                fields += (self.sparse[k](ids[:, k]),)
        first = int(self.n_sparse > 0)
        for k in range(self.n_multi):
            ids, mask = inputs[first + 2 * k], inputs[first + 2 * k + 1]
            total = (self.multi[k](ids) * mask.expand_dims(-1)).sum(1)
            fields += (total / ops.maximum(mask.sum(1, keepdims=True), 1.0),)
        dense = inputs[-1] if self.n_dense else None
        return ops.stack(fields, 1), dense


class Tower(nn.Cell):
    """Embeddings -> field attention (Light-SE, SENET or none) -> flatten, append dense -> MLP.

    Returns every MLP layer's output (a tuple of (B, hidden[l]))."""

    def __init__(self, spec, cfg, se=None):
        super().__init__()
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim)
        self.attention = field_attention(se or cfg.se, self.embedding.n_fields)
        self.flat_dim = self.embedding.n_fields * cfg.embed_dim
        in_dim = self.flat_dim + self.embedding.n_dense
        self.mlp = MLP(in_dim, cfg.mlp, cfg.dropout, cfg.batch_norm)

    def construct(self, *inputs):
        fields, dense = self.embedding(*inputs)
        if self.attention is not None:
            fields = self.attention(fields)
        x = fields.reshape((-1, self.flat_dim))
        if dense is not None:
            x = ops.concat((x, dense), 1)
        return self.mlp(x)


class RecModel(nn.Cell):
    """What every model offers the training loop: construct(*inputs) -> logits (B,);
    forward(*inputs) -> (logits, extras) and, when has_aux, aux_loss(extras, labels) -> scalar."""
    has_aux = False
    decoupled = False  # True: user_representation / item_representation / score exist

    def __init__(self, meta):
        super().__init__()
        self.n_user_inputs = sum(name.startswith("user_") for name in meta["inputs"])

    def forward(self, *inputs):
        return self.construct(*inputs), ()


class IntTower(RecModel):
    """User and item towers joined by one interaction (configurable for the paper's ablations).

    interaction 'fe' : FE-Block MaxSim over H heads of every user layer (or the last only);
    interaction 'dot': the plain two-tower dot product of the last layers;
    interaction 'fc' : an MLP over both last layers (the "FE-Block -> FC" ablation; this couples the
                       towers, so it cannot be served from an item index).
    se: Light-SE, SENET or none on each tower's field embeddings; cir_weight > 0 adds the CIR loss."""

    def __init__(self, meta, cfg):
        super().__init__(meta)
        self.interaction = cfg.interaction
        self.decoupled = cfg.interaction != "fc"
        self.user_tower = Tower(meta["towers"]["user"], cfg)
        self.item_tower = Tower(meta["towers"]["item"], cfg)
        last = cfg.mlp[-1]
        if cfg.interaction == "fe":
            self.fe = FEBlock(cfg.mlp, last, cfg.heads, cfg.head_dim, cfg.last_layer_only)
        elif cfg.interaction == "fc":
            self.head = nn.SequentialCell([nn.Dense(2 * last, last, activation="relu"), nn.Dense(last, 1)])
        self.bias = ms.Parameter(ms.Tensor(0.0, ms.float32), name="bias")
        self.cir_weight = float(cfg.cir_weight)
        self.has_aux = self.cir_weight > 0
        self.cir = CIRLoss(cfg.cir_tau)
        self.cir_dim = cfg.heads * cfg.head_dim if cfg.interaction == "fe" else last

    def user_representation(self, *user_inputs):
        """(B, L, H, p) FE heads, or (B, hidden) for dot/fc."""
        layers = self.user_tower(*user_inputs)
        return self.fe.user_heads(layers) if self.interaction == "fe" else layers[-1]

    def item_representation(self, *item_inputs):
        """(B, H, p) FE heads, or (B, hidden) for dot/fc."""
        last = self.item_tower(*item_inputs)[-1]
        return self.fe.item_heads(last) if self.interaction == "fe" else last

    def score(self, user, item):
        """Logits (B,) of user and item representations (for fe/dot, user may be one row)."""
        if self.interaction == "fe":
            return self.fe(user, item) + self.bias
        if self.interaction == "dot":
            return (user * item).sum(-1) + self.bias
        return self.head(ops.concat((user, item), -1)).squeeze(-1)

    def forward(self, *inputs):
        user = self.user_representation(*inputs[:self.n_user_inputs])
        item = self.item_representation(*inputs[self.n_user_inputs:])
        return self.score(user, item), (user, item)

    def construct(self, *inputs):
        return self.forward(*inputs)[0]

    def aux_loss(self, extras, labels):
        """CIR between the representations the score uses (the last user layer's heads for fe)."""
        user, item = extras
        if self.interaction == "fe":
            user, item = user[:, -1], item
        user, item = user.reshape((-1, self.cir_dim)), item.reshape((-1, self.cir_dim))
        return self.cir_weight * self.cir(user, item, labels)


class LossCell(nn.Cell):
    """BCE on the logits plus the model's auxiliary loss (CIR, DAT's mimic loss...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.bce = nn.BCEWithLogitsLoss()

    def construct(self, *batch):
        logits, extras = self.model.forward(*batch[:-1])
        loss = self.bce(logits, batch[-1])
        if self.model.has_aux:
            loss = loss + self.model.aux_loss(extras, batch[-1])
        return loss


def model_config(cfg):
    """The config a --model name stands for (two_tower is IntTower with every addition off)."""
    if cfg.model == "two_tower":
        return cfg.replace(se="none", interaction="dot", cir_weight=0.0)
    return cfg


def build_model(meta, cfg):
    cfg = model_config(cfg)
    if cfg.model in ("inttower", "two_tower"):
        return IntTower(meta, cfg)
    raise UserError(f"model {cfg.model!r} is not available yet")


def check_inputs(meta, arrays):
    """Refuse ids outside the vocabularies the model was built for (one clear message)."""
    for tower, spec in meta["towers"].items():
        fields = [(f"{tower}_sparse", k, f) for k, f in enumerate(spec["sparse"])]
        fields += [(f"{tower}_{f['name']}", None, f) for f in spec["multi"]]
        for name, column, f in fields:
            if name not in arrays:
                raise UserError(f"input {name} is missing")
            values = arrays[name] if column is None else arrays[name][:, column]
            if values.size and (values.min() < 0 or values.max() >= f["vocab_size"]):
                bad = values.max() if values.max() >= f["vocab_size"] else values.min()
                raise UserError(f"field {f['name']}: id {bad} is outside the model's vocabulary "
                                f"(0..{f['vocab_size'] - 1}); was the model built for another data set?")


def describe(model):
    return {"class": type(model).__name__, "parameters": count_params(model)}

