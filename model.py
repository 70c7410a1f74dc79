"""IntTower and the models it is compared with, assembled from module.py's cells and meta.json.

Nothing here knows MovieLens: field names, vocabulary sizes and input arrays come from
`meta["towers"]` (written by get_dataset.py). A model takes the input arrays named by
`meta["inputs"]` (user arrays first, then item arrays) and returns click logits (B,).
"""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from get_dataset import id_field
from model_config import MODELS
from module import CIRLoss, CrossNet, FEBlock, FM, MLP, SelfAttention, count_params, field_attention, unit
from util import UserError


SMALL_VOCAB = 64  # FeatureEmbedding.masked_mean


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
            fields += (self.masked_mean(self.multi[k], inputs[first + 2 * k], inputs[first + 2 * k + 1]),)
        dense = inputs[-1] if self.n_dense else None
        return ops.stack(fields, 1), dense

    def masked_mean(self, table, ids, mask):
        """(B, L) ids and their 0/1 mask -> the mean of the masked-in ids' embeddings (B, D); 0 without any.
        In training, a small vocabulary (at most SMALL_VOCAB ids, as genres) is read as a (B, V) matrix of each
        row's weights times the table: one product forward and one backward, where the gathered (B, L, D)
        embeddings, their masked sum over L and its gradient are several kernels over a larger array
        (docs/performance.md). Inference and exports take the gathered form (ops every exporter knows)."""
        weights = mask / ops.maximum(mask.sum(1, keepdims=True), 1.0)
        if table.vocab_size > SMALL_VOCAB or not self.training:
            return (table(ids) * weights.expand_dims(-1)).sum(1)
        n, vocab = ids.shape[0], table.vocab_size
        cells = (ops.arange(n, dtype=ids.dtype).reshape((-1, 1)) * vocab + ids).reshape((-1,))  # row b, id j: b V + j
        row_weights = ops.unsorted_segment_sum(weights.reshape((-1,)), cells, n * vocab).reshape((n, vocab))
        return ops.matmul(row_weights, table.embedding_table)


def flatten(fields, dense, flat_dim):
    """(B, F, D) field embeddings and (B, n_dense) or None -> the MLP input (B, F*D + n_dense)."""
    x = fields.reshape((-1, flat_dim))
    return x if dense is None else ops.concat((x, dense), 1)


class Tower(nn.Cell):
    """Embeddings -> field attention (Light-SE, SENET or none) -> flatten, append dense -> MLP.

    Returns the MLP input and every MLP layer's output (a tuple of n + 1 arrays). `extra_dim` widens the MLP input
    for a vector the caller appends (DAT's augmented vector)."""

    def __init__(self, spec, cfg, se=None, extra_dim=0):
        super().__init__()
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim)
        self.attention = field_attention(se or cfg.se, self.embedding.n_fields, cfg.embed_dim)
        self.flat_dim = self.embedding.n_fields * cfg.embed_dim
        self.mlp_in = self.flat_dim + self.embedding.n_dense + extra_dim
        self.mlp = MLP(self.mlp_in, cfg.mlp, cfg.dropout, cfg.batch_norm, linear_last=cfg.linear_output,
                       last_batch_norm=cfg.output_batch_norm, masks=cfg.dropout_masks,
                       norm_kernel=cfg.batch_norm_kernel)

    def features(self, *inputs):
        fields, dense = self.embedding(*inputs)
        if self.attention is not None:
            fields = self.attention(fields)
        return flatten(fields, dense, self.flat_dim)

    def construct(self, *inputs):
        """Every representation from the MLP input (index 0) to the last layer's output (index n)."""
        x = self.features(*inputs)
        return (x,) + self.mlp(x)


def fe_user_layers(cfg):
    """Indices into a user tower's representations (0: MLP input, k: layer k's output) for --fe_layers."""
    n = len(cfg.mlp)
    layers = {"outputs": range(1, n + 1), "inputs": range(0, n), "all": range(0, n + 1)}[cfg.fe_layers]
    return tuple(layers)[-1:] if cfg.last_layer_only else tuple(layers)


class RecModel(nn.Cell):
    """What every model offers the training loop: construct(*inputs) -> logits (B,);
    forward(*inputs) -> (logits, extras) and, when has_aux, aux_loss(extras, labels) -> scalar."""
    has_aux = False
    decoupled = False  # True: user_representation / item_representation / score exist
    scoring = None     # decoupled models: "maxsim" (FE-Block heads) or "dot" (one vector per side)

    def __init__(self, meta):
        super().__init__()
        self.n_user_inputs = sum(name.startswith("user_") for name in meta["inputs"])

    def forward(self, *inputs):
        return self.construct(*inputs), ()


class IntTower(RecModel):
    """User and item towers joined by one interaction (configurable for the paper's ablations).

    interaction 'fe' : FE-Block MaxSim over H heads of every user layer (or the last only);
    interaction 'dot': the plain two-tower dot product of the last layers;
    interaction 'cosine': DSSM's cosine of the last layers times a learned scale (an inverse temperature,
                       started at `cosine_scale`); the scale is folded into the user vector, so an index
                       scores it as a plain dot product;
    interaction 'fc' : an MLP over both last layers (the "FE-Block -> FC" ablation; this couples the
                       towers, so it cannot be served from an item index).
    se: Light-SE, SENET or none on each tower's field embeddings; cir_weight > 0 adds the CIR loss."""

    def __init__(self, meta, cfg):
        super().__init__(meta)
        self.interaction = cfg.interaction
        self.decoupled = cfg.interaction != "fc"
        self.scoring = {"fe": "maxsim", "dot": "dot", "cosine": "dot"}.get(cfg.interaction)
        self.user_tower = Tower(meta["towers"]["user"], cfg)
        self.item_tower = Tower(meta["towers"]["item"], cfg)
        last = cfg.mlp[-1]
        if cfg.interaction == "fe":
            dims = (self.user_tower.mlp_in,) + tuple(cfg.mlp)
            self.fe = FEBlock(dims, last, cfg.heads, cfg.head_dim, fe_user_layers(cfg), cfg.fe_mean,
                             cfg.maxsim_kernel)
        elif cfg.interaction == "fc":
            self.head = nn.SequentialCell([nn.Dense(2 * last, last, activation="relu"), nn.Dense(last, 1)])
        elif cfg.interaction == "cosine":
            self.log_scale = ms.Parameter(ms.Tensor(math.log(cfg.cosine_scale), ms.float32), name="log_scale")
        self.bias = ms.Parameter(ms.Tensor(0.0, ms.float32), name="bias")
        self.cir_weight = float(cfg.cir_weight)
        self.has_aux = self.cir_weight > 0
        self.cir = CIRLoss(cfg.cir_tau, cfg.cir_mask_same_item)
        self.cir_anchors = cfg.cir_anchors
        needs_ids = [f"--{key}" for key in ("cir_mask_same_item", "cir_logq") if getattr(cfg, key)]
        if needs_ids and not meta["towers"]["item"]["sparse"]:
            raise UserError(f"{' and '.join(needs_ids)}: the item tower has no id field (no categorical field)")
        self.item_id = id_field(meta["towers"], "item") if needs_ids else None
        self.cir_log_q = None  # --cir_logq: log of each item id's share of the training rows (set_item_counts)
        if cfg.cir_logq:
            vocab = meta["towers"]["item"]["sparse"][self.item_id]["vocab_size"]
            self.cir_log_q = ms.Parameter(ops.zeros(vocab, ms.float32), name="cir_log_q", requires_grad=False)

    def _user(self, inputs):
        layers = self.user_tower(*inputs)
        if self.interaction == "fe":
            return self.fe.user_heads(layers), layers[-1]
        if self.interaction == "cosine":
            return unit(layers[-1]) * ops.exp(self.log_scale), layers[-1]
        return layers[-1], layers[-1]

    def _item(self, inputs):
        last = self.item_tower(*inputs)[-1]
        if self.interaction == "fe":
            return self.fe.item_heads(last), last
        return (unit(last) if self.interaction == "cosine" else last), last

    def user_representation(self, *user_inputs):
        """(B, L, H, p) FE heads, or (B, hidden) for dot/fc (cosine: unit length times the scale)."""
        return self._user(user_inputs)[0]

    def item_representation(self, *item_inputs):
        """(B, H, p) FE heads, or (B, hidden) for dot/fc (cosine: unit length)."""
        return self._item(item_inputs)[0]

    def score(self, user, item):
        """Logits (B,) of B user and B item representations (pairs)."""
        if self.interaction == "fe":
            return self.fe(user, item) + self.bias
        if self.interaction in ("dot", "cosine"):
            return (user * item).sum(-1) + self.bias
        return self.head(ops.concat((user, item), -1)).squeeze(-1)

    def forward(self, *inputs):
        item_ids = inputs[self.n_user_inputs][:, self.item_id] if self.item_id is not None else None
        if self.interaction == "fe":  # from the layers: the FE-Block's fused kernel in training (FEBlock.pair_scores)
            layers = self.user_tower(*inputs[:self.n_user_inputs])
            item_last = self.item_tower(*inputs[self.n_user_inputs:])[-1]
            return self.fe.pair_scores(layers, item_last) + self.bias, (layers[-1], item_last, item_ids)
        user, user_last = self._user(inputs[:self.n_user_inputs])
        item, item_last = self._item(inputs[self.n_user_inputs:])
        return self.score(user, item), (user_last, item_last, item_ids)

    def construct(self, *inputs):
        return self.forward(*inputs)[0]

    def aux_loss(self, extras, labels):
        """CIR between the towers' last layers (the representations every interaction reads), with the
        first `cir_anchors` rows of the batch as anchors (0: all rows) against all of its items (whose
        ids tell CIR which negatives are the anchor's own item, --cir_mask_same_item, and their sampling
        probability, --cir_logq)."""
        user, item, item_ids = extras
        log_q = ops.gather(self.cir_log_q, item_ids, 0) if self.cir_log_q is not None else None
        if self.cir_anchors:
            return self.cir_weight * self.cir(user[:self.cir_anchors], item, labels[:self.cir_anchors], item_ids, log_q)
        return self.cir_weight * self.cir(user, item, labels, item_ids, log_q)

    def set_item_counts(self, counts):
        """--cir_logq: the training rows of each item id (length: the id field's vocabulary) -> the log of each
        item's share, add-one smoothed (an item never seen in training is still a possible negative)."""
        counts = np.asarray(counts, np.float64) + 1.0
        self.cir_log_q.set_data(ms.Tensor(np.log(counts / counts.sum()), ms.float32))


class DAT(RecModel):
    """Dual Augmented Two-tower (Yu et al., 2021): each tower also reads a learned "augmented vector" of its
    id (the tower's id field: meta.json's towers[t]["id"], declared by the schema; else its first sparse field), trained by the adaptive-mimic loss to imitate the other tower's
    output for clicked pairs: dat_weight * mean(y * (|a_u - sg(p_v)|^2 + |a_v - sg(p_u)|^2)).
    Score: the dot product of the tower outputs. (The published PyTorch DAT draws the augmented vectors
    at random on every call, which makes the mimic loss meaningless; this one learns them.)"""
    decoupled = True
    has_aux = True
    scoring = "dot"

    def __init__(self, meta, cfg):
        super().__init__(meta)
        dim = cfg.mlp[-1]
        cfg = cfg.replace(se="none")
        self.user_tower = Tower(meta["towers"]["user"], cfg, extra_dim=dim)
        self.item_tower = Tower(meta["towers"]["item"], cfg, extra_dim=dim)
        towers = meta["towers"]
        self.user_id, self.item_id = id_field(towers, "user"), id_field(towers, "item")
        self.user_augment = nn.Embedding(towers["user"]["sparse"][self.user_id]["vocab_size"], dim)
        self.item_augment = nn.Embedding(towers["item"]["sparse"][self.item_id]["vocab_size"], dim)
        self.bias = ms.Parameter(ms.Tensor(0.0, ms.float32), name="bias")
        self.weight = float(cfg.dat_weight)

    def _side(self, tower, augment, inputs, column):
        aug = augment(inputs[0][:, column])
        return tower.mlp(ops.concat((tower.features(*inputs), aug), 1))[-1], aug

    def user_representation(self, *user_inputs):
        return self._side(self.user_tower, self.user_augment, user_inputs, self.user_id)[0]

    def item_representation(self, *item_inputs):
        return self._side(self.item_tower, self.item_augment, item_inputs, self.item_id)[0]

    def score(self, user, item):
        return (user * item).sum(-1) + self.bias

    def forward(self, *inputs):
        user, user_aug = self._side(self.user_tower, self.user_augment, inputs[:self.n_user_inputs], self.user_id)
        item, item_aug = self._side(self.item_tower, self.item_augment, inputs[self.n_user_inputs:], self.item_id)
        return self.score(user, item), (user, item, user_aug, item_aug)

    def construct(self, *inputs):
        return self.forward(*inputs)[0]

    def aux_loss(self, extras, labels):
        user, item, user_aug, item_aug = extras
        mimic_u = ((user_aug - ops.stop_gradient(item)) ** 2).sum(-1)
        mimic_v = ((item_aug - ops.stop_gradient(user)) ** 2).sum(-1)
        return self.weight * ((mimic_u + mimic_v) * labels).mean()


class FieldModel(RecModel):
    """Base of the models that read user and item fields together (coupled: no item index)."""

    def __init__(self, meta, cfg, dim=None):
        super().__init__(meta)
        dim = dim or cfg.embed_dim
        self.user_embedding = FeatureEmbedding(meta["towers"]["user"], dim)
        self.item_embedding = FeatureEmbedding(meta["towers"]["item"], dim)
        self.n_fields = self.user_embedding.n_fields + self.item_embedding.n_fields
        self.n_dense = self.user_embedding.n_dense + self.item_embedding.n_dense
        self.flat_dim = self.n_fields * dim

    def embed(self, *inputs):
        """All fields (B, F_user + F_item, D) and all dense values (B, n_dense) or None."""
        user, user_dense = self.user_embedding(*inputs[:self.n_user_inputs])
        item, item_dense = self.item_embedding(*inputs[self.n_user_inputs:])
        if user_dense is None or item_dense is None:
            dense = item_dense if user_dense is None else user_dense
        else:
            dense = ops.concat((user_dense, item_dense), 1)
        return ops.concat((user, item), 1), dense


class LR(FieldModel):
    """Logistic regression: one weight per feature value (dimension-1 embeddings) and per dense value."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg, dim=1)
        self.dense = nn.Dense(self.n_dense, 1) if self.n_dense else None

    def construct(self, *inputs):
        fields, dense = self.embed(*inputs)
        logit = fields.sum((1, 2))
        return logit + self.dense(dense).squeeze(-1) if self.dense is not None else logit


class DeepModel(FieldModel):
    """Shared by the ranking models: field embeddings, an MLP over them, a linear output layer over
    the MLP's last layer and whatever `parts(fields, x)` adds (cross network, attention...)."""

    def __init__(self, meta, cfg, wide=False, se=None):
        super().__init__(meta, cfg)
        self.attention = field_attention(se, self.n_fields, cfg.embed_dim) if se else None
        self.mlp = MLP(self.flat_dim + self.n_dense, cfg.mlp, cfg.dropout, cfg.batch_norm, masks=cfg.dropout_masks,
                       norm_kernel=cfg.batch_norm_kernel)
        self.out = nn.Dense(cfg.mlp[-1] + self.parts_width(cfg), 1)
        self.wide = LR(meta, cfg) if wide else None

    def parts_width(self, cfg):
        return 0

    def parts(self, fields, x):
        return ()

    def pairwise(self, fields):
        return 0.0

    def construct(self, *inputs):
        fields, dense = self.embed(*inputs)
        if self.attention is not None:
            fields = self.attention(fields)
        x = flatten(fields, dense, self.flat_dim)
        hidden = self.mlp(x)[-1]
        extra = self.parts(fields, x)
        logit = self.out(ops.concat((hidden,) + extra, 1) if extra else hidden).squeeze(-1) + self.pairwise(fields)
        return logit + self.wide(*inputs) if self.wide is not None else logit


class WideDeep(DeepModel):
    """Wide & Deep (Cheng et al., 2016): logistic regression + MLP."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg, wide=True)


class DeepFM(DeepModel):
    """DeepFM (Guo et al., 2017): first-order weights + FM pairwise term + MLP, sharing embeddings."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg, wide=True)
        self.fm = FM()

    def pairwise(self, fields):
        return self.fm(fields)


class COLD(DeepModel):
    """COLD (Wang et al., 2020), the pre-ranking model: SE feature weighting over all user and item
    fields, then an MLP, plus the linear part (as in the published comparison code)."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg, wide=True, se="senet")


class DCN(DeepModel):
    """Deep & Cross Network (Wang et al., 2017): a cross network beside the MLP, both read by the output."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg)
        self.cross = CrossNet(self.flat_dim + self.n_dense, cfg.cross_layers)

    def parts_width(self, cfg):
        return self.flat_dim + self.n_dense

    def parts(self, fields, x):
        return (self.cross(x),)


class AutoInt(DeepModel):
    """AutoInt+ (Song et al., 2019): multi-head self-attention layers over the fields beside the MLP."""

    def __init__(self, meta, cfg):
        super().__init__(meta, cfg)
        head_dim = max(1, cfg.embed_dim // cfg.attention_heads)
        self.attention_layers = nn.CellList([SelfAttention(cfg.embed_dim if i == 0 else head_dim * cfg.attention_heads,
                                                           cfg.attention_heads, head_dim)
                                             for i in range(cfg.attention_layers)])

    def parts_width(self, cfg):
        self.att_dim = self.n_fields * max(1, cfg.embed_dim // cfg.attention_heads) * cfg.attention_heads
        return self.att_dim

    def parts(self, fields, x):
        for layer in self.attention_layers:
            fields = layer(fields)
        return (fields.reshape((-1, self.att_dim)),)


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


def build_model(meta, cfg):
    """The model `cfg.model` names (model_config.MODELS: its class here and its preset)."""
    return globals()[MODELS[cfg.model].cls](meta, cfg.for_model())


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

