"""The building blocks of IntTower and of the comparison models, one idea per cell.

Shapes: B batch, F fields, D embedding size, L user layers used by the FE-Block, H heads, p head size.
"""
import functools

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import XavierNormal, initializer

from util import build_library


class FieldAttention(nn.Cell):
    """What Light-SE and SENET share: each field's mean embedding, and the fields re-weighted, both as
    matrix products with constant 0/1 block matrices: (B, F*D) @ (F*D, F) / D is the field means,
    (B, F) @ (F, F*D) repeats a weight over its field's D values. Their gradients are products too; those
    of a sum over D and of a broadcast product are a broadcast and a reduction, slower on CPU here
    (docs/performance.md, "What each part of a step costs")."""

    def __init__(self, field_size, dim):
        super().__init__()
        blocks = np.kron(np.eye(field_size, dtype=np.float32), np.ones((1, dim), np.float32))  # (F, F*D)
        self.spread, self.average = ms.Tensor(blocks), ms.Tensor(np.ascontiguousarray(blocks.T) / dim)

    def field_means(self, embeddings):
        """(B, F, D) -> (B, F)."""
        return ops.matmul(embeddings.reshape((embeddings.shape[0], -1)), self.average)

    def reweight(self, embeddings, weights):
        """(B, F, D) * (B, F) per field -> (B, F, D)."""
        flat = embeddings.reshape((embeddings.shape[0], -1))
        return (flat * ops.matmul(weights, self.spread)).reshape(embeddings.shape)


class LightSE(FieldAttention):
    """Light-SE field attention: (B, F, D) -> (B, F, D).

    z = mean of each field's embedding (B, F); a = softmax(W z + b) over the F fields;
    output e + e * a (residual: a field is re-weighted, never erased)."""

    def __init__(self, field_size, dim):
        super().__init__(field_size, dim)
        self.excitation = nn.Dense(field_size, field_size)

    def weights(self, embeddings):
        """The attention a (B, F); sums to 1 over fields."""
        return ops.softmax(self.excitation(self.field_means(embeddings)), axis=-1)

    def construct(self, embeddings):
        return self.reweight(embeddings, 1.0 + self.weights(embeddings))  # e + e * a, one full-size op


class SENET(FieldAttention):
    """Squeeze-excitation (FiBiNET): (B, F, D) -> (B, F, D), e * sigmoid(W2 relu(W1 z)).

    The paper's "w/ SENET" ablation of Light-SE."""

    def __init__(self, field_size, dim, reduction=3):
        super().__init__(field_size, dim)
        hidden = max(1, field_size // reduction)
        self.squeeze = nn.Dense(field_size, hidden, activation="relu")
        self.excite = nn.Dense(hidden, field_size, activation="sigmoid")

    def weights(self, embeddings):
        return self.excite(self.squeeze(self.field_means(embeddings)))

    def construct(self, embeddings):
        return self.reweight(embeddings, self.weights(embeddings))


def field_attention(kind, field_size, dim):
    """The cell of `--se` (lightse, senet) over F = field_size fields of D = dim values, or None."""
    return {"lightse": LightSE, "senet": SENET}[kind](field_size, dim) if kind != "none" else None


KERNEL_SOURCES = ("batch_norm.cc", "maxsim.cc")


@functools.lru_cache(maxsize=None)
def kernel_library():
    """The training kernels (KERNEL_SOURCES: BatchNorm with ReLU, the FE-Block's MaxSim) as one shared library for
    MindSpore's Custom ops of type "aot" (util.build_library: g++ for this CPU, once per process, ~2 s): its path,
    or None where it cannot be had: a device other than the CPU (whose kernels are fused already) or no working
    C++ compiler (the reason on stderr). The cells then train with MindSpore ops."""
    if ms.get_context("device_target") != "CPU":
        return None
    return build_library(KERNEL_SOURCES, "BatchNorm and MaxSim train as MindSpore ops")


@functools.lru_cache(maxsize=None)
def fused_batch_norm():
    """BatchNorm's training forward (and ReLU) as one MindSpore Custom op of type "aot", its gradient as a second:
    (x, gamma, beta, (eps, relu)) -> (y, mean, biased var). batch_norm.cc in `kernel_library`; None where that
    cannot be had."""
    library = kernel_library()
    if library is None:
        return None

    def forward_outputs(x, gamma, beta, options):
        return x, gamma, gamma  # y (B, C), mean (C,), var (C,): shapes and dtypes

    def backward_outputs(dy, x, y, gamma, mean, var, options):
        return x, gamma, gamma  # dx, dgamma, dbeta

    backward = ops.Custom(f"{library}:BatchNormBackward", out_shape=backward_outputs, out_dtype=backward_outputs,
                          func_type="aot")

    def bprop(x, gamma, beta, options, out, dout):
        # mean and var leave the cell only through stop_gradient (the moving averages): their gradients are 0
        dx, dgamma, dbeta = backward(dout[0], x, out[0], gamma, out[1], out[2], options)
        return dx, dgamma, dbeta, ops.zeros_like(options)

    return ops.Custom(f"{library}:BatchNormForward", out_shape=forward_outputs, out_dtype=forward_outputs,
                      func_type="aot", bprop=bprop)


@functools.lru_cache(maxsize=None)
def fused_maxsim(layers, heads):
    """The FE-Block's training score over `layers` user layers of `heads` heads as one Custom op of type "aot",
    its gradient as a second: (u_1 .. u_L (B, H p) before their biases, user biases (L, H p), v (B, H p) before its
    bias, item bias (H p)) -> (score (B,), argmax (B, L H) int32). maxsim.cc in `kernel_library`; None where that
    cannot be had, for more than 4 layers (a graph-mode bprop has its arguments spelled out: 1 to 4 are) or more
    than 16 heads (the kernel's kMaxHeads)."""
    library = kernel_library()
    if library is None or not 1 <= layers <= 4 or not 1 <= heads <= 16:
        return None

    def forward_shapes(*inputs):
        return [inputs[0][0]], [inputs[0][0], layers * heads]

    def forward_dtypes(*inputs):
        return inputs[0], ms.int32

    def backward_outputs(dscore, *inputs):
        return inputs[:layers + 3]  # du_1 .. du_L, duser bias, dv, ditem bias: the inputs' shapes and dtypes

    backward = ops.Custom(f"{library}:MaxSimBackward", out_shape=backward_outputs, out_dtype=backward_outputs,
                          func_type="aot")

    def bprop1(u1, ub, v, vb, out, dout):  # (inputs, out, dout) -> the inputs' gradients
        return backward(dout[0], u1, ub, v, vb, out[1])

    def bprop2(u1, u2, ub, v, vb, out, dout):
        return backward(dout[0], u1, u2, ub, v, vb, out[1])

    def bprop3(u1, u2, u3, ub, v, vb, out, dout):
        return backward(dout[0], u1, u2, u3, ub, v, vb, out[1])

    def bprop4(u1, u2, u3, u4, ub, v, vb, out, dout):
        return backward(dout[0], u1, u2, u3, u4, ub, v, vb, out[1])

    return ops.Custom(f"{library}:MaxSimForward", out_shape=forward_shapes, out_dtype=forward_dtypes,
                      func_type="aot", bprop=(bprop1, bprop2, bprop3, bprop4)[layers - 1])


class BatchNorm(nn.Cell):
    """BatchNorm over the batch axis of (B, C), then ReLU if `relu`: (B, C) -> (B, C). Inference uses the moving
    statistics.

    Same result as nn.BatchNorm1d (moving statistics with `momentum`, unbiased moving variance). `kernel`:
    "fused", one C++ kernel forward and one backward (`fused_batch_norm`; the "ops" form where that cannot be
    had), or "ops", MindSpore ops with the statistics in one pass, E[x] and E[x^2], several times cheaper than
    nn.BatchNorm1d's kernel on CPU here (docs/design.md, "Training step")."""

    def __init__(self, channels, momentum=0.9, eps=1e-5, kernel="fused", relu=False):
        super().__init__()
        self.gamma = ms.Parameter(ops.ones(channels, ms.float32), name="gamma")
        self.beta = ms.Parameter(ops.zeros(channels, ms.float32), name="beta")
        self.moving_mean = ms.Parameter(ops.zeros(channels, ms.float32), name="moving_mean", requires_grad=False)
        self.moving_variance = ms.Parameter(ops.ones(channels, ms.float32), name="moving_variance",
                                            requires_grad=False)
        self.momentum, self.eps = momentum, eps
        self.fused = fused_batch_norm() if kernel == "fused" else None
        self.relu = relu
        self.options = ms.Tensor([eps, float(relu)], ms.float32)

    def normalise(self, x):
        """Training: (output, batch mean, biased batch variance)."""
        if self.fused is not None:
            return self.fused(x, self.gamma, self.beta, self.options)
        # The batch means as (1, B) @ (B, C) products with weights 1/B and the per-column scale and shift
        # repeated to (B, C): on CPU here an element-wise op with a broadcast operand is ~4x slower than on
        # equal shapes, and the gradient of a batch sum is such an op; the variance is clipped by ReLU (one
        # gradient kernel): few kernels (docs/design.md, "Training step").
        n = x.shape[0]
        weights = ops.fill(x.dtype, (1, n), 1.0 / n)
        mean = ops.matmul(weights, x).reshape((-1,))
        var = ops.relu(ops.matmul(weights, x * x).reshape((-1,)) - mean * mean)  # >= 0 despite rounding
        scale = self.gamma * ops.rsqrt(var + self.eps)
        shift = self.beta - mean * scale
        y = x * ops.broadcast_to(scale, x.shape) + ops.broadcast_to(shift, x.shape)
        return (ops.relu(y) if self.relu else y), mean, var

    def construct(self, x):
        if self.training:
            n = x.shape[0]
            y, mean, var = self.normalise(x)
            # each moving average is one Lerp
            ops.assign(self.moving_mean, ops.lerp(self.moving_mean, ops.stop_gradient(mean), 1 - self.momentum))
            ops.assign(self.moving_variance, ops.lerp(self.moving_variance,
                                                      ops.stop_gradient(var) * (n / max(n - 1, 1)), 1 - self.momentum))
            return y
        # inference: sqrt and division, ops MindSpore's ONNX exporter knows (it lacks Rsqrt); broadcasting
        # operands, as the batch size of an exported graph is dynamic
        scale = self.gamma / ops.sqrt(self.moving_variance + self.eps)
        y = x * scale + (self.beta - self.moving_mean * scale)
        return ops.relu(y) if self.relu else y


def mask_pool(p, channels, rows=8192):
    """(rows, channels) float32 inverted-dropout masks: Bernoulli(1 - p) keeps scaled by 1 / (1 - p), drawn
    from NumPy's global generator (seeded by --seed; ~20x faster than MindSpore's ops.rand)."""
    return ((np.random.random((rows, channels)) >= p).astype(np.float32) / np.float32(1.0 - p))


class Dropout(nn.Cell):
    """Inverted dropout whose masks are rows of a fixed pool: (B, C) -> (B, C); identity at inference.

    The pool holds `pool_rows` masks of C independent Bernoulli(1 - p) keeps scaled by 1 / (1 - p), drawn once
    from NumPy's generator (seeded by --seed). The pool is read in order, like a tape: a step's B rows take the
    next B pool rows (wrapping around), and `mask_offset`, the position on the tape, is a parameter saved in
    checkpoints. The training data are shuffled every epoch, so a sample meets a random pool row each step, and
    each unit is dropped with probability p independently of the others, as with nn.Dropout. It is cheaper on
    CPU, where nn.Dropout's kernel draws one random number per element (a gather and a product instead:
    docs/performance.md), and it holds no random generator: runs with dropout repeat exactly, and a resumed run
    is the uninterrupted one, which nn.Dropout's masks are not here (docs/design.md, "Training step")."""

    def __init__(self, p, channels, pool_rows=8192):
        super().__init__()
        self.pool = ms.Tensor(mask_pool(p, channels, pool_rows))
        self.mask_offset = ms.Parameter(ms.Tensor(0, ms.int64), name="mask_offset", requires_grad=False)

    def construct(self, x):
        if not self.training:
            return x
        n = x.shape[0]
        rows = (ops.arange(n, dtype=ms.int64) + self.mask_offset) % self.pool.shape[0]
        ops.assign_add(self.mask_offset, ops.scalar_to_tensor(n, ms.int64))
        return x * ops.stop_gradient(ops.gather(self.pool, rows, 0))


def dropout_cell(p, channels, masks="pool"):
    """The dropout cell of `--dropout_masks`: pool (Dropout above) or kernel (nn.Dropout)."""
    return Dropout(p, channels) if masks == "pool" else nn.Dropout(p=p)


class MLP(nn.Cell):
    """Dense -> BatchNorm -> ReLU -> Dropout per layer: (B, in) -> tuple of every layer's output
    (B, hidden[l]); the FE-Block reads all of them, other models the last. `linear_last`: the last layer
    is Dense -> BatchNorm only, a linear output a dot product or CIR can use with either sign; with
    `last_batch_norm` False, Dense (with its bias) only. `masks`: where Dropout's masks come from
    (`dropout_cell`); `norm_kernel`: BatchNorm's `kernel` ("fused": BatchNorm applies the ReLU in its kernel,
    and the ReLU's place in the layer holds an nn.Identity, so that the cells after it keep their parameter
    names)."""

    def __init__(self, in_dim, hidden, dropout=0.0, batch_norm=True, linear_last=False, last_batch_norm=True,
                 masks="pool", norm_kernel="fused"):
        super().__init__()
        layers = []
        for k, size in enumerate(hidden):
            hidden_layer = not (linear_last and k == len(hidden) - 1)
            norm = batch_norm and (hidden_layer or last_batch_norm)
            block = [nn.Dense(in_dim, size, has_bias=not norm)]  # BatchNorm's beta is the bias
            fuse = norm and hidden_layer and norm_kernel == "fused"
            block += [BatchNorm(size, kernel=norm_kernel, relu=fuse)] if norm else []
            block += [nn.Identity() if fuse else nn.ReLU()] if hidden_layer else []
            block += [dropout_cell(dropout, size, masks)] if dropout > 0 and hidden_layer else []
            layers.append(nn.SequentialCell(block))
            in_dim = size
        self.layers = nn.CellList(layers)
        self.out_dims = tuple(hidden)

    def construct(self, x):
        outputs = ()
        for layer in self.layers:
            x = layer(x)
            outputs += (x,)
        return outputs


class FEBlock(nn.Cell):
    """FE-Block: multi-head late interaction between a multi-layer user tower and the item tower.

    user_heads: each selected user representation -> H heads of p dims: (B, L, H, p). The user tower
    offers its MLP input (index 0: the field embeddings after Light-SE, and the dense values) and
    every MLP layer's output (1..n); `user_layers` picks L of them.
    item_heads: the last item layer -> (B, H, p).
    score: sum over user layers and user heads of the max over item heads of <u, v>: (B,).
    With `mean`, the user heads are multiplied by 1/(L*H), i.e. the sum becomes a mean over the
    user heads: the same family of scores (max is positively homogeneous), but the initial logits
    no longer grow with L*H (docs/design.md, "FE-Block: a mean over the user heads").
    A user's heads are computed once per user and an item's once per item, so items can be
    indexed offline (scorer.py scores one user against an index of N items).
    `kernel` "fused": in training, `pair_scores` adds the biases, takes the products and their maxima in one C++
    kernel forward and one backward (`fused_maxsim`; the ops below where that cannot be had); "ops": MindSpore
    ops, as at inference and in every export."""

    def __init__(self, user_dims, item_dim, heads=4, head_dim=64, user_layers=None, mean=False, kernel="fused"):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.user_layers = tuple(range(len(user_dims))) if user_layers is None else tuple(user_layers)
        self.user_proj = nn.CellList([nn.Dense(user_dims[i], heads * head_dim) for i in self.user_layers])
        self.item_proj = nn.Dense(item_dim, heads * head_dim)
        self.user_scale = 1.0 / (len(self.user_layers) * heads) if mean else 1.0
        self.dot_t = ops.BatchMatMul(transpose_b=True)  # no Transpose op forward or backward
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.fused = fused_maxsim(len(self.user_layers), heads) if kernel == "fused" else None

    def keep_last_layer_only(self):
        """Drop every user projection but the last (the accelerated serving variant); the scale stays."""
        self.user_proj = nn.CellList([self.user_proj[len(self.user_layers) - 1]])
        self.user_layers = self.user_layers[-1:]
        self.fused = fused_maxsim(1, self.heads) if self.fused is not None else None

    def user_projection(self, k):
        """The weight and bias of the k-th user projection, times user_scale: the scale is applied to them (a few
        thousand products) rather than to the heads (B x L*H*p products, forward and backward)."""
        proj = self.user_proj[k]
        if self.user_scale == 1.0:
            return proj.weight, proj.bias
        return proj.weight * self.user_scale, proj.bias * self.user_scale

    def user_heads(self, user_layers):
        """(B, L, H, p), times user_scale."""
        heads = ()
        for k, i in enumerate(self.user_layers):
            weight, bias = self.user_projection(k)
            head = ops.bias_add(self.matmul_t(user_layers[i], weight), bias)
            heads += (head.reshape((-1, 1, self.heads, self.head_dim)),)
        return ops.concat(heads, 1) if len(heads) > 1 else heads[0]

    def item_heads(self, item_last):
        return self.item_proj(item_last).reshape((-1, self.heads, self.head_dim))

    def construct(self, user, item):
        """MaxSim score of (B, L, H, p) users and their (B, H, p) items -> (B,)."""
        n_user_heads = len(self.user_layers) * self.heads
        dots = self.dot_t(user.reshape((-1, n_user_heads, self.head_dim)), item)
        return dots.max(axis=-1).sum(-1)

    def pair_scores(self, user_layers, item_last):
        """The score of B (user, item) pairs from the user tower's layers and the item tower's last layer: (B,).
        In training with the fused kernel, the projections without their biases go to the kernel, which adds
        the biases itself (no head is concatenated, biased or split in memory); else the heads, then the score."""
        if not (self.training and self.fused is not None):
            return self.construct(self.user_heads(user_layers), self.item_heads(item_last))
        users, biases = (), ()
        for k, i in enumerate(self.user_layers):
            weight, bias = self.user_projection(k)
            users += (self.matmul_t(user_layers[i], weight),)
            biases += (bias,)
        item = self.matmul_t(item_last, self.item_proj.weight)
        return self.fused(*users, ops.stack(biases), item, self.item_proj.bias)[0]


def unit(x, eps=1e-12):
    """Rows of x scaled to unit length (written out: ops.L2Normalize's gradient is very slow on CPU)."""
    return x * ops.rsqrt((x * x).sum(-1, keepdims=True) + eps)


class CIRLoss(nn.Cell):
    """Contrastive in-batch InfoNCE between user and item representations (the paper's CIR).

    For every clicked row i (label 1): -log softmax_j(cos(u_i, v_j) / tau)[i], where j runs over the
    items of the batch (row i's item is the positive, the others are the negatives); averaged over
    the clicked rows, exactly 0 without any. `user` may hold only the first K rows (anchors) of the
    batch: (K, d) against (B, d) items. With `mask_same_item`, a row j != i whose item id equals row i's
    is left out of row i's softmax: it is the anchor's own item, not a negative (on MovieLens most clicked
    anchors have their item elsewhere in a 2,048-row batch). `log_q` (B,), the log of each batch row's item
    sampling probability (its share of the training rows), is subtracted from that item's logit in every row,
    the positive's included: the sampling-bias (log-Q) correction of in-batch negatives, which are drawn by
    popularity (Yi et al., RecSys 2019). Log-sum-exp with the max subtracted (stable)."""

    def __init__(self, tau=0.2, mask_same_item=False, eps=1e-12):
        super().__init__()
        self.tau, self.mask_same_item, self.eps = tau, mask_same_item, eps
        self.matmul_t = ops.MatMul(transpose_b=True)

    def construct(self, user, item, labels, item_ids=None, log_q=None):
        u, v = unit(user, self.eps) * (1.0 / self.tau), unit(item, self.eps)
        logits = self.matmul_t(u, v)  # (K, B) cos / tau
        if log_q is not None:
            logits = logits - log_q.reshape((1, -1))
        if self.mask_same_item:
            k, n = u.shape[0], v.shape[0]
            same = ops.equal(item_ids[:k].reshape((-1, 1)), item_ids.reshape((1, -1))).astype(logits.dtype)
            logits = logits - (same - ops.eye(k, n, logits.dtype)) * 1e9  # exp(-1e9) = 0: out of the softmax
        top = ops.stop_gradient(logits.max(axis=1, keepdims=True))
        log_norm = ops.log(ops.exp(logits - top).sum(1)) + top.squeeze(1)
        positive = (u * v[:u.shape[0]]).sum(-1)  # user i's own item is row i
        if log_q is not None:
            positive = positive - log_q[:u.shape[0]]
        return ((log_norm - positive) * labels).sum() / ops.maximum(labels.sum(), 1.0)


def count_params(cell):
    return int(sum(p.size for p in cell.trainable_params()))



class FM(nn.Cell):
    """Factorization-machine pairwise term: (B, F, D) -> (B,), sum over field pairs of <e_i, e_j>."""

    def construct(self, embeddings):
        total = embeddings.sum(1)
        return 0.5 * (total * total - (embeddings * embeddings).sum(1)).sum(-1)


class CrossNet(nn.Cell):
    """DCN cross network (vector form): x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l; (B, d) -> (B, d)."""

    def __init__(self, dim, layers=3):
        super().__init__()
        self.weights = ms.ParameterTuple(ms.Parameter(initializer(XavierNormal(), (dim, 1), ms.float32), name=f"w{i}")
                                         for i in range(layers))
        self.biases = ms.ParameterTuple(ms.Parameter(ops.zeros(dim, ms.float32), name=f"b{i}") for i in range(layers))

    def construct(self, x0):
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * ops.matmul(x, w) + b + x
        return x


class SelfAttention(nn.Cell):
    """AutoInt's interacting layer: multi-head self-attention over fields with a residual projection
    and ReLU; (B, F, D) -> (B, F, heads * head_dim)."""

    def __init__(self, in_dim, heads=2, head_dim=16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        out = heads * head_dim
        self.query = nn.Dense(in_dim, out, has_bias=False)
        self.key = nn.Dense(in_dim, out, has_bias=False)
        self.value = nn.Dense(in_dim, out, has_bias=False)
        self.residual = nn.Dense(in_dim, out, has_bias=False)
        self.scale = head_dim ** -0.5

    def _split(self, x, fields):  # (B, F, H*d) -> (B, H, F, d)
        return x.reshape((-1, fields, self.heads, self.head_dim)).transpose(0, 2, 1, 3)

    def construct(self, x):
        fields = x.shape[1]
        q, k, v = self._split(self.query(x), fields), self._split(self.key(x), fields), self._split(self.value(x), fields)
        attention = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale, axis=-1)
        out = ops.matmul(attention, v).transpose(0, 2, 1, 3).reshape((-1, fields, self.heads * self.head_dim))
        return ops.relu(out + self.residual(x))
