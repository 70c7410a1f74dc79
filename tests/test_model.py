"""module.py / model.py: every cell against a small numpy reference, decoupling, every switch."""
import itertools

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import model as M
from model_config import Config
from module import BatchNorm, CIRLoss, Dropout, FEBlock, LightSE, MLP, SENET
from util import UserError
from conftest import needs_gxx

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def T(a):
    return ms.Tensor(np.asarray(a))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dense(cell, x):
    return x @ cell.weight.asnumpy().T + cell.bias.asnumpy()


# ---------------------------------------------------------------- cells vs numpy

def test_lightse_matches_numpy_and_weights_sum_to_one():
    e = RNG.normal(size=(5, 4, 3)).astype(np.float32)
    cell = LightSE(4, 3)
    a = softmax(dense(cell.excitation, e.mean(-1)))
    np.testing.assert_allclose(cell(T(e)).asnumpy(), e + e * a[..., None], atol=1e-5)
    w = cell.weights(T(e)).asnumpy()
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert w.shape == (5, 4) and (w > 0).all()


def test_lightse_gradients_match_numpy():
    """The field means and the re-weighting are matrix products (module.FieldAttention): their gradients
    against the chain rule of e + e * softmax(W mean(e) + b), written out in numpy."""
    e, dy = RNG.normal(size=(2, 5, 4, 3)).astype(np.float32)
    cell = LightSE(4, 3)
    w = cell.excitation.weight.asnumpy()
    de, (dw, db) = ms.grad(lambda x: (cell(x) * T(dy)).sum(), grad_position=0, weights=cell.trainable_params())(T(e))
    a = softmax(dense(cell.excitation, e.mean(-1)))
    ga = (dy * e).sum(-1)                                  # d loss / d a
    gl = a * (ga - (a * ga).sum(-1, keepdims=True))        # through the softmax
    np.testing.assert_allclose(de.asnumpy(), dy * (1 + a[..., None]) + (gl @ w)[..., None] / 3, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), gl.T @ e.mean(-1), atol=1e-5)
    np.testing.assert_allclose(db.asnumpy(), gl.sum(0), atol=1e-5)


def test_senet_matches_numpy():
    e = RNG.normal(size=(5, 6, 3)).astype(np.float32)
    cell = SENET(6, 3, reduction=3)
    hidden = np.maximum(dense(cell.squeeze, e.mean(-1)), 0)
    a = 1 / (1 + np.exp(-dense(cell.excite, hidden)))
    np.testing.assert_allclose(cell(T(e)).asnumpy(), e * a[..., None], atol=1e-5)


def batchnorm_reference(x, gamma, beta, relu, eps=1e-5):
    """(y, dL/dx, dL/dgamma, dL/dbeta as functions of dL/dy) of BatchNorm in training, ReLU after if `relu`."""
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + eps)
    z = xhat * gamma + beta
    y = np.maximum(z, 0) if relu else z

    def grads(dy):
        g = dy * (z > 0) if relu else dy
        dx = gamma / np.sqrt(x.var(0) + eps) * (g - g.mean(0) - xhat * (g * xhat).mean(0))
        return dx, (g * xhat).sum(0), g.sum(0)
    return y, grads


KERNELS = [pytest.param(kernel, relu, marks=[needs_gxx] if kernel == "fused" else [])
           for kernel in ("ops", "fused") for relu in (False, True)]


@pytest.mark.parametrize("kernel,relu", KERNELS)
def test_batchnorm_matches_numpy_train_and_eval(kernel, relu):
    x = RNG.normal(2.0, 3.0, size=(64, 7)).astype(np.float32)
    bn = BatchNorm(7, momentum=0.9, kernel=kernel, relu=relu)
    assert (bn.fused is not None) == (kernel == "fused")  # the kernel built here (g++ present), or the test is moot
    bn.gamma.set_data(T(RNG.normal(size=7).astype(np.float32)))
    bn.beta.set_data(T(RNG.normal(size=7).astype(np.float32)))
    g, b = bn.gamma.asnumpy(), bn.beta.asnumpy()
    bn.set_train(True)
    out = bn(T(x)).asnumpy()
    np.testing.assert_allclose(out, batchnorm_reference(x, g, b, relu)[0], atol=1e-4)
    np.testing.assert_allclose(bn.moving_mean.asnumpy(), 0.1 * x.mean(0), atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.asnumpy(), 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-4)
    bn.set_train(False)
    mm, mv = bn.moving_mean.asnumpy(), bn.moving_variance.asnumpy()
    z = (x - mm) / np.sqrt(mv + 1e-5) * g + b
    np.testing.assert_allclose(bn(T(x)).asnumpy(), np.maximum(z, 0) if relu else z, atol=1e-4)


@pytest.mark.parametrize("kernel,relu", KERNELS)
def test_batchnorm_gradients_match_numpy(kernel, relu):
    """Both training paths (ops: batch sums as products, operands repeated to equal shapes; fused: batch_norm.cc)
    have the gradients of batch normalisation (and ReLU): with g = dy (masked by z > 0 under ReLU),
    dx = gamma/sigma (g - mean(g) - xhat mean(g xhat)), dgamma = sum(g xhat), dbeta = sum(g)."""
    x = RNG.normal(1.0, 2.0, size=(32, 5)).astype(np.float32)
    dy = RNG.normal(size=(32, 5)).astype(np.float32)
    bn = BatchNorm(5, kernel=kernel, relu=relu)
    bn.gamma.set_data(T(RNG.normal(size=5).astype(np.float32)))
    bn.beta.set_data(T(RNG.normal(size=5).astype(np.float32)))
    bn.set_train(True)
    _, grads = batchnorm_reference(x, bn.gamma.asnumpy(), bn.beta.asnumpy(), relu)
    got = ms.grad(lambda v: (bn(v) * T(dy)).sum(), 0, bn.trainable_params())(T(x))
    for value, ref in zip([got[0], *got[1]], grads(dy)):
        np.testing.assert_allclose(value.asnumpy(), ref, atol=1e-4)


@needs_gxx
def test_fused_batchnorm_trains_as_the_ops_one_in_graph_mode():
    """The training step's mode: an MLP with dropout from a pool and a linear last layer (BatchNorm alone) has the
    same loss and gradients with either kernel, over two steps (the second reads the next masks of the pool)."""
    x, dy = RNG.normal(size=(256, 12)).astype(np.float32), RNG.normal(size=(256, 5)).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE)
    results = {}
    for kernel in ("ops", "fused"):
        ms.set_seed(1)
        np.random.seed(1)  # the pools of masks
        mlp = MLP(12, (16, 8, 5), dropout=0.3, linear_last=True, norm_kernel=kernel)
        mlp.set_train(True)

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.mlp = mlp

            def construct(self, v):
                return (self.mlp(v)[-1] * T(dy)).sum()
        step = ms.value_and_grad(Loss(), None, mlp.trainable_params())
        results[kernel] = [[loss.asnumpy()] + [g.asnumpy() for g in grads]
                           for loss, grads in (step(T(x)), step(T(x)))]
        offsets = [int(p.asnumpy()) for name, p in mlp.parameters_and_names() if name.endswith("mask_offset")]
        assert offsets == [2 * 256] * 2
    # fused: the ReLU inside BatchNorm's kernel (its place kept, so that the Dropout keeps its parameter names)
    assert [type(c) for c in mlp.layers[0]] == [nn.Dense, BatchNorm, nn.Identity, Dropout] and mlp.layers[0][1].relu
    assert not np.allclose(results["ops"][0][0], results["ops"][1][0])  # the masks moved on
    for a, b in zip(sum(results["ops"], []), sum(results["fused"], [])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fused_kernels_fall_back_to_ops_without_a_compiler(monkeypatch, capsys):
    import module
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(module, "kernel_library", module.kernel_library.__wrapped__)
    assert module.fused_batch_norm.__wrapped__() is None
    assert "BatchNorm and MaxSim train as MindSpore ops (the C++ kernels did not build" in capsys.readouterr().err
    assert module.fused_maxsim.__wrapped__(3, 4) is None


def test_mlp_returns_every_layer():
    mlp = MLP(10, (8, 6, 4), dropout=0.0, batch_norm=True)
    mlp.set_train(False)
    x = RNG.normal(size=(3, 10)).astype(np.float32)
    outs = mlp(T(x))
    assert [o.shape for o in outs] == [(3, 8), (3, 6), (3, 4)]
    h = x
    for layer, o in zip(mlp.layers, outs):  # Dense (no bias: BN's beta) -> BN (eval: moving stats 0/1) -> ReLU
        dense_cell, bn = layer[0], layer[1]
        assert dense_cell.bias is None
        h = h @ dense_cell.weight.asnumpy().T
        h = np.maximum(h / np.sqrt(1 + 1e-5) * bn.gamma.asnumpy() + bn.beta.asnumpy(), 0)
        np.testing.assert_allclose(o.asnumpy(), h, atol=1e-5)


def test_pooled_dropout_reads_the_pool_in_order_and_is_seeded():
    """--dropout_masks pool: row i of a step's batch is multiplied by pool row (offset + i) mod rows (keeps
    scaled by 1 / (1 - p), keep rate 1 - p), the offset is a saved parameter that moves on by B each step, the
    gradient is the mask, inference is the identity (and leaves the offset), and the same seed gives the same
    pool."""
    p, rows, width, n = 0.3, 64, 6, 40
    np.random.seed(7)  # the pool's generator
    cell = Dropout(p, width, pool_rows=rows)
    pool = cell.pool.asnumpy()
    assert pool.shape == (rows, width) and set(np.unique(pool)) <= {0.0, np.float32(1 / (1 - p))}
    assert abs((pool > 0).mean() - (1 - p)) < 0.1  # 384 draws: sd 0.023
    assert "mask_offset" in dict(cell.parameters_and_names())  # in every checkpoint: a resume goes on from it
    x = RNG.uniform(1, 2, size=(n, width)).astype(np.float32)
    cell.set_train(True)
    for step in range(3):  # 40 rows a step on a 64-row pool: the second step wraps around
        np.testing.assert_allclose(cell(T(x)).asnumpy() / x, pool[(np.arange(n) + step * n) % rows], rtol=1e-6)
    assert int(cell.mask_offset.asnumpy()) == 3 * n
    grad = ms.grad(lambda v: cell(v).sum())(T(x)).asnumpy()
    np.testing.assert_array_equal(grad, pool[(np.arange(n) + 3 * n) % rows])
    cell.set_train(False)
    np.testing.assert_array_equal(cell(T(x)).asnumpy(), x)
    assert int(cell.mask_offset.asnumpy()) == 4 * n
    np.random.seed(7)
    np.testing.assert_array_equal(Dropout(p, width, pool_rows=rows).pool.asnumpy(), pool)
    kernel = M.build_model(META, SMALL.replace(model="two_tower", dropout=0.1, dropout_masks="kernel"))
    assert type(kernel.user_tower.mlp.layers[0].cell_list[-1]) is nn.Dropout
    pooled = M.build_model(META, SMALL.replace(model="two_tower", dropout=0.1))  # the default reaches the towers
    assert type(pooled.user_tower.mlp.layers[0].cell_list[-1]) is Dropout


def maxsim_loops(user, item):
    """Brute force: sum over user layers and heads of max over item heads of <u, v>."""
    b, n_layers, heads, _ = user.shape
    out = np.zeros(b)
    for i in range(b):
        for l in range(n_layers):
            for h in range(heads):
                out[i] += max(float(user[i, l, h] @ item[i, k]) for k in range(item.shape[1]))
    return out


def test_feblock_heads_and_maxsim_equal_loops():
    fe = FEBlock((8, 6, 5), 5, heads=3, head_dim=4)
    layers = tuple(T(RNG.normal(size=(4, d)).astype(np.float32)) for d in (8, 6, 5))
    user = fe.user_heads(layers).asnumpy()
    item = fe.item_heads(layers[-1]).asnumpy()
    assert user.shape == (4, 3, 3, 4) and item.shape == (4, 3, 4)
    for l in range(3):  # each layer's projection, reshaped into heads
        np.testing.assert_allclose(user[:, l].reshape(4, -1), dense(fe.user_proj[l], layers[l].asnumpy()), atol=1e-5)
    np.testing.assert_allclose(fe(T(user), T(item)).asnumpy(), maxsim_loops(user, item), atol=1e-4)


def test_feblock_last_layer_only_is_the_reduced_formula():
    fe = FEBlock((8, 6, 5), 5, heads=2, head_dim=3, user_layers=(2,))
    layers = tuple(T(RNG.normal(size=(4, d)).astype(np.float32)) for d in (8, 6, 5))
    user, item = fe.user_heads(layers).asnumpy(), fe.item_heads(layers[-1]).asnumpy()
    assert user.shape == (4, 1, 2, 3) and len(fe.user_proj) == 1
    u = dense(fe.user_proj[0], layers[-1].asnumpy()).reshape(4, 2, 3)
    reduced = np.einsum("bhp,bkp->bhk", u, item).max(-1).sum(-1)
    np.testing.assert_allclose(fe(T(user), T(item)).asnumpy(), reduced, atol=1e-4)


def test_feblock_mean_divides_the_sum_by_the_user_heads():
    summed, mean = FEBlock((8, 6, 5), 5, heads=3, head_dim=4), FEBlock((8, 6, 5), 5, heads=3, head_dim=4, mean=True)
    ms.load_param_into_net(mean, {p.name: p for p in summed.get_parameters()})
    layers = tuple(T(RNG.normal(size=(4, d)).astype(np.float32)) for d in (8, 6, 5))
    user, item = summed.user_heads(layers).asnumpy(), summed.item_heads(layers[-1]).asnumpy()
    np.testing.assert_allclose(mean.user_heads(layers).asnumpy(), user / 9, rtol=1e-5, atol=1e-7)  # L*H = 3*3
    np.testing.assert_allclose(mean(mean.user_heads(layers), T(item)).asnumpy(), maxsim_loops(user, item) / 9,
                               rtol=1e-4, atol=1e-5)


def test_feblock_one_user_repeated_against_many_items():
    fe = FEBlock((6, 5), 5, heads=2, head_dim=3)
    user = np.repeat(RNG.normal(size=(1, 2, 2, 3)).astype(np.float32), 7, 0)
    items = RNG.normal(size=(7, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(fe(T(user), T(items)).asnumpy(), maxsim_loops(user, items), atol=1e-4)


def feblock_reference(fe, layers, item_last, g):
    """NumPy FE-Block in training: the score of each pair and the gradients of sum(g * score) with respect to the
    picked user layers, the item layer and the parameters (user projections' weights and biases, then the item
    projection's), the gradient of each max going to its first maximum."""
    s = fe.user_scale
    xs = [layers[i] for i in fe.user_layers]
    users = [s * dense(proj, x) for proj, x in zip(fe.user_proj, xs)]
    b, h, p = len(item_last), fe.heads, fe.head_dim
    V = dense(fe.item_proj, item_last).reshape(b, h, p)
    U = np.stack(users, 1).reshape(b, -1, h, p)
    dots = np.einsum("blhp,bkp->blhk", U, V)
    arg = dots.argmax(-1)  # first maximum
    score = dots.max(-1).sum((1, 2))
    dU = g[:, None, None, None] * np.take_along_axis(V[:, None], arg.reshape(b, -1, 1)[..., None], 2).reshape(U.shape)
    dV = np.zeros_like(V)
    for k in range(h):
        dV[:, k] = g[:, None] * (U * (arg == k)[..., None]).sum((1, 2))
    d_layers = [np.zeros_like(x) for x in layers]
    d_params = []
    for l, (proj, x) in enumerate(zip(fe.user_proj, xs)):
        du = dU[:, l].reshape(b, -1)
        d_layers[fe.user_layers[l]] += s * du @ proj.weight.asnumpy()
        d_params += [s * du.T @ x, s * du.sum(0)]
    dv = dV.reshape(b, -1)
    d_params += [dv.T @ item_last, dv.sum(0)]
    return score, d_layers, dv @ fe.item_proj.weight.asnumpy(), d_params


MAXSIM_KERNELS = [pytest.param(kernel, marks=[needs_gxx] if kernel == "fused" else []) for kernel in ("ops", "fused")]


@pytest.mark.parametrize("kernel", MAXSIM_KERNELS)
@pytest.mark.parametrize("heads,head_dim,user_layers,mean", [(3, 4, (0, 1, 2), True), (4, 16, (1, 2), False),
                                                             (2, 12, (2,), False)])
def test_feblock_training_score_and_gradients_match_numpy(kernel, heads, head_dim, user_layers, mean):
    """Both training paths of the FE-Block (ops: heads, then a batched product and its maxima; fused: maxsim.cc,
    which adds the biases itself) give the NumPy score and gradients, for H of the kernel's generic path (3) and
    of its unrolled ones (2, 4), heads whose size is a multiple of its eight lanes or not, 1 to 3 user layers,
    with and without the mean over the heads."""
    dims, b = (9, 7, 6), 16
    fe = FEBlock(dims, 6, heads=heads, head_dim=head_dim, user_layers=user_layers, mean=mean, kernel=kernel)
    assert (fe.fused is not None) == (kernel == "fused")
    calls, kernel_op = [], fe.fused
    if kernel_op is not None:  # count the kernel's calls: the fused path must be the one that ran
        fe.fused = lambda *args: calls.append(len(args)) or kernel_op(*args)
    fe.set_train(True)
    layers = [RNG.normal(size=(b, d)).astype(np.float32) for d in dims]
    item = RNG.normal(size=(b, 6)).astype(np.float32)
    g = RNG.normal(size=b).astype(np.float32)
    score, d_layers, d_item, d_params = feblock_reference(fe, layers, item, g)
    np.testing.assert_allclose(fe.pair_scores(tuple(T(x) for x in layers), T(item)).asnumpy(), score, rtol=1e-4,
                               atol=1e-4)
    got_inputs, got_params = ms.grad(lambda x0, x1, x2, y: (fe.pair_scores((x0, x1, x2), y) * T(g)).sum(),
                                     (0, 1, 2, 3), fe.trainable_params())(*(T(x) for x in layers), T(item))
    unused = [i for i in range(3) if i not in user_layers]
    for i, (got, ref) in enumerate(zip(got_inputs, d_layers + [d_item])):
        np.testing.assert_allclose(got.asnumpy(), 0 * ref if i in unused else ref, rtol=1e-4, atol=1e-4)
    assert [p.name.split(".")[-1] for p in fe.trainable_params()] == ["weight", "bias"] * (len(user_layers) + 1)
    for got, ref in zip(got_params, d_params):
        np.testing.assert_allclose(got.asnumpy(), ref, rtol=1e-4, atol=1e-4)
    assert calls == ([len(user_layers) + 3] * 2 if kernel == "fused" else [])  # u_1..u_L, biases, v, item bias


@needs_gxx
def test_fused_maxsim_in_graph_mode_equals_ops_and_is_not_in_inference():
    """The training step's mode: the fused kernel's loss and gradients are the ops path's; out of training (as in
    every export) the FE-Block takes the ops path; a NaN product makes the score NaN (so the loss shows it)."""
    dims, b = (20, 12, 8), 64
    layers = tuple(T(RNG.normal(size=(b, d)).astype(np.float32)) for d in dims)
    item, g = T(RNG.normal(size=(b, 8)).astype(np.float32)), T(RNG.normal(size=b).astype(np.float32))
    ms.set_context(mode=ms.GRAPH_MODE)
    results, blocks = {}, {}
    for kernel in ("ops", "fused"):
        ms.set_seed(1)
        fe = blocks[kernel] = FEBlock(dims, 8, heads=4, head_dim=8, kernel=kernel)
        fe.set_train(True)

        class Loss(nn.Cell):
            def __init__(self):
                super().__init__()
                self.fe = fe

            def construct(self, x0, x1, x2, y):
                return (self.fe.pair_scores((x0, x1, x2), y) * g).sum()
        loss, (inputs, params) = ms.value_and_grad(Loss(), (0, 1, 2, 3), fe.trainable_params())(*layers, item)
        results[kernel] = [loss.asnumpy()] + [x.asnumpy() for x in inputs + params]
    for a, c in zip(results["ops"], results["fused"]):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    fused = blocks["fused"]
    fused.set_train(False)
    kernel_op = fused.fused

    def refuse(*args):
        raise AssertionError("the fused kernel ran out of training")
    fused.fused = refuse
    inference = fused.pair_scores(layers, item).asnumpy()
    np.testing.assert_allclose(inference, fused(fused.user_heads(layers), fused.item_heads(item)).asnumpy())
    fused.fused = kernel_op
    fused.set_train(True)
    poisoned = (layers[0], layers[1], T(np.where(np.arange(b)[:, None] == 3, np.nan, layers[2].asnumpy())))
    score = fused.pair_scores(poisoned, item).asnumpy()
    assert np.isnan(score[3]) and np.isfinite(np.delete(score, 3)).all()


@needs_gxx
def test_fused_maxsim_only_up_to_four_user_layers_and_sixteen_heads():
    assert FEBlock((4,) * 4, 4, heads=16, head_dim=2, kernel="fused").fused is not None
    assert FEBlock((4,) * 5, 4, heads=2, head_dim=2, kernel="fused").fused is None  # five layers: the ops path
    assert FEBlock((4,) * 2, 4, heads=17, head_dim=2, kernel="fused").fused is None


def test_cir_hand_computed_3x3():
    u = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    v = np.array([[1, 0], [1, 1], [0, 2]], np.float32)
    y = np.array([1, 0, 1], np.float32)
    tau = 0.5
    # cosine similarities, computed by hand: rows users, columns items
    s = 1 / np.sqrt(2)
    cos = np.array([[1, s, 0], [0, s, 1], [s, 1, s]])
    expected = np.mean([np.log(np.exp(cos[i] / tau).sum()) - cos[i, i] / tau for i in (0, 2)])
    loss = CIRLoss(tau)(T(u), T(v), T(y)).asnumpy()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_cir_zero_without_positives_and_finite_gradient():
    cir = CIRLoss(0.1)
    u = RNG.normal(size=(6, 4)).astype(np.float32)
    v = RNG.normal(size=(6, 4)).astype(np.float32)
    assert float(cir(T(u), T(v), T(np.zeros(6, np.float32))).asnumpy()) == 0.0
    big = u * 1e4  # large logits: the log-sum-exp must stay finite
    grad = ms.grad(lambda a, b: cir(a, b, T(np.ones(6, np.float32))), grad_position=(0, 1))(T(big), T(v))
    assert all(np.isfinite(g.asnumpy()).all() for g in grad)
    assert np.isfinite(cir(T(big), T(v), T(np.ones(6, np.float32))).asnumpy())


def cir_reference(u, v, y, ids, tau, mask=False, log_q=None):
    """CIR in numpy: K = len(u) anchors (the first rows) against all items; same-item rows out of an anchor's
    softmax with `mask`; log q_j subtracted from every logit of item j, the positive's included."""
    k = len(u)
    un, vn = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = un @ vn.T / tau - (0 if log_q is None else log_q[None, :])
    keep = (ids[:k, None] != ids[None, :]) | np.eye(k, len(v), dtype=bool) if mask else np.ones(logits.shape, bool)
    per_row = np.log((np.exp(logits) * keep).sum(1)) - np.diag(logits[:, :k])
    return (per_row * y).sum() / y.sum()


def test_cir_masks_the_anchors_own_item_elsewhere_in_the_batch():
    """--cir_mask_same_item: row j != i with row i's item id is left out of row i's softmax, nothing else."""
    u = RNG.normal(size=(6, 4)).astype(np.float32)
    v = RNG.normal(size=(6, 4)).astype(np.float32)
    y = np.array([1, 1, 0, 1, 1, 1], np.float32)
    ids = np.array([7, 3, 7, 5, 3, 7], np.int32)  # rows 0, 2, 5 share an item; rows 1, 4 too
    expected = cir_reference(u[:4], v, y[:4], ids, 0.3, mask=True)  # 4 anchors against all 6 items
    masked = CIRLoss(0.3, mask_same_item=True)(T(u[:4]), T(v), T(y[:4]), T(ids)).asnumpy()
    np.testing.assert_allclose(masked, expected, rtol=1e-5)
    unmasked = CIRLoss(0.3)(T(u[:4]), T(v), T(y[:4]), T(ids)).asnumpy()
    assert unmasked > masked + 1e-3  # the duplicates were negatives before: the test can tell the two apart


def test_model_cir_masks_by_the_item_id_column():
    net = M.build_model(META, SMALL.replace(cir_mask_same_item=True, cir_anchors=0))
    net.set_train(False)
    b = batch(8)
    b["item_sparse"][:, 0] = [1, 2, 1, 3, 1, 4, 5, 2]
    _, (u, v, ids) = net.forward(*inputs(b))
    np.testing.assert_array_equal(ids.asnumpy(), b["item_sparse"][:, 0])
    y = T(b["label"])
    expected = SMALL.cir_weight * CIRLoss(SMALL.cir_tau, True)(u, v, y, ids).asnumpy()
    np.testing.assert_allclose(net.aux_loss((u, v, ids), y).asnumpy(), expected, rtol=1e-6)


def test_cir_logq_subtracts_each_items_log_share_from_its_logit():
    """--cir_logq: logit(i, j) - log q_j for every in-batch item j, the positive included (numpy reference)."""
    u = RNG.normal(size=(6, 4)).astype(np.float32)
    v = RNG.normal(size=(6, 4)).astype(np.float32)
    y = np.array([1, 1, 0, 1, 1, 1], np.float32)
    ids = np.array([7, 3, 7, 5, 3, 7], np.int32)
    log_q = np.log(np.array([0.5, 0.1, 0.5, 0.05, 0.1, 0.5], np.float32))  # the rows' items' shares
    for mask in (False, True):
        expected = cir_reference(u[:4], v, y[:4], ids, 0.3, mask, log_q)
        got = CIRLoss(0.3, mask_same_item=mask)(T(u[:4]), T(v), T(y[:4]), T(ids), T(log_q)).asnumpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        plain = CIRLoss(0.3, mask_same_item=mask)(T(u[:4]), T(v), T(y[:4]), T(ids)).asnumpy()
        assert abs(plain - got) > 1e-3  # the correction changes the loss: the test can tell it is applied


def test_model_cir_logq_gathers_the_log_shares_of_the_item_ids():
    net = M.build_model(META, SMALL.replace(cir_logq=True, cir_anchors=3))
    counts = np.array([0, 5, 1, 2, 0, 9, 3, 0, 4])  # rows per movie_id (vocabulary 9)
    net.set_item_counts(counts)
    shares = (counts + 1) / (counts + 1).sum()
    np.testing.assert_allclose(np.exp(net.cir_log_q.asnumpy()), shares, rtol=1e-6)
    net.set_train(False)
    b = batch(8)
    b["item_sparse"][:, 0] = [1, 2, 1, 3, 5, 4, 6, 8]
    _, (u, v, ids) = net.forward(*inputs(b))
    y = T(b["label"])
    log_q = T(np.log(shares[b["item_sparse"][:, 0]]).astype(np.float32))
    expected = SMALL.cir_weight * CIRLoss(SMALL.cir_tau)(u[:3], v, y[:3], ids, log_q).asnumpy()
    np.testing.assert_allclose(net.aux_loss((u, v, ids), y).asnumpy(), expected, rtol=1e-5)
    assert abs(expected - SMALL.cir_weight * CIRLoss(SMALL.cir_tau)(u[:3], v, y[:3], ids).asnumpy()) > 1e-4


def test_cir_options_that_read_item_ids_refuse_a_tower_without_them():
    meta = {**META, "towers": {**META["towers"], "item": {**META["towers"]["item"], "sparse": []}}}
    for key in ("cir_mask_same_item", "cir_logq"):
        with pytest.raises(UserError, match=f"--{key}: the item tower has no id field"):
            M.build_model(meta, SMALL.replace(**{key: True}))


# ---------------------------------------------------------------- models from meta.json

META = {
    "towers": {
        "user": {"sparse": [{"name": "user_id", "vocab_size": 11}, {"name": "gender", "vocab_size": 3}],
                 "multi": [], "dense": ["user_mean_rating"]},
        "item": {"sparse": [{"name": "movie_id", "vocab_size": 9}],
                 "multi": [{"name": "genres", "vocab_size": 5, "max_len": 3}], "dense": ["item_mean_rating"]},
    },
    "inputs": ["user_sparse", "user_dense", "item_sparse", "item_genres", "item_genres_mask", "item_dense"],
}
SMALL = Config(embed_dim=4, mlp=(8, 6), heads=2, head_dim=3, dropout=0.0, cir_weight=0.5)


def batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((n, 3)) < 0.7).astype(np.float32)
    return {"user_sparse": np.stack([rng.integers(0, 11, n), rng.integers(0, 3, n)], 1).astype(np.int32),
            "user_dense": rng.random((n, 1), dtype=np.float32),
            "item_sparse": rng.integers(0, 9, (n, 1)).astype(np.int32),
            "item_genres": (rng.integers(1, 5, (n, 3)) * mask).astype(np.int32), "item_genres_mask": mask,
            "item_dense": rng.random((n, 1), dtype=np.float32),
            "label": (rng.random(n) < 0.5).astype(np.float32)}


def inputs(b):
    return [T(b[k]) for k in META["inputs"]]


def test_embedding_sizes_come_from_meta():
    net = M.build_model(META, SMALL)
    tables = {p.name: p.shape for p in net.get_parameters() if "embedding_table" in p.name}
    assert sorted(s[0] for s in tables.values()) == [3, 5, 9, 11]
    assert all(s[1] == 4 for s in tables.values())


@pytest.mark.parametrize("training,small_vocab", [(False, 64), (True, 64), (True, 0)],
                         ids=["inference", "training-product", "training-gathered"])
def test_masked_mean_of_genres(monkeypatch, training, small_vocab):
    """The mean of the masked-in ids' embeddings and its gradient, in each of FeatureEmbedding.masked_mean's forms:
    gathered (inference; a vocabulary over SMALL_VOCAB ids) or a (B, V) matrix of row weights times the table
    (training, a small vocabulary); a row without any id is 0."""
    monkeypatch.setattr(M, "SMALL_VOCAB", small_vocab)
    calls, scatter = [], M.ops.unsorted_segment_sum  # the product form's one scatter: which form ran
    monkeypatch.setattr(M.ops, "unsorted_segment_sum", lambda *args: calls.append(1) or scatter(*args))
    net = M.build_model(META, SMALL)
    b = batch()
    b["item_genres_mask"][2] = 0
    emb = net.item_tower.embedding
    emb.set_train(training)
    inputs = T(b["item_sparse"]), T(b["item_genres"]), T(b["item_genres_mask"]), T(b["item_dense"])
    fields, dense_values = emb(*inputs)
    table = emb.multi[0].embedding_table
    m = b["item_genres_mask"]
    weights = m / np.maximum(m.sum(1, keepdims=True), 1)
    ref = (table.asnumpy()[b["item_genres"]] * weights[..., None]).sum(1)
    np.testing.assert_allclose(fields.asnumpy()[:, 1], ref, atol=1e-6)
    assert fields.shape == (6, 2, 4) and dense_values.shape == (6, 1) and not fields.asnumpy()[2, 1].any()
    g = RNG.normal(size=(6, 4)).astype(np.float32)
    grad = ms.grad(lambda *x: (emb(*x)[0][:, 1] * T(g)).sum(), None, [table])(*inputs)[0].asnumpy()
    ref_grad = np.zeros_like(grad)
    np.add.at(ref_grad, b["item_genres"], weights[..., None] * g[:, None])
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
    assert bool(calls) == (training and small_vocab > 0)


def test_towers_are_decoupled():
    net = M.build_model(META, SMALL)
    net.set_train(False)
    a, b = batch(seed=1), batch(seed=2)
    nu = net.n_user_inputs
    user_a = net.user_representation(*inputs(a)[:nu]).asnumpy()
    mixed = {**a, **{k: b[k] for k in b if k.startswith("item_")}}
    np.testing.assert_array_equal(net.user_representation(*inputs(mixed)[:nu]).asnumpy(), user_a)
    item_b = net.item_representation(*inputs(b)[nu:]).asnumpy()
    np.testing.assert_array_equal(net.item_representation(*inputs(mixed)[nu:]).asnumpy(), item_b)
    # the score of the separate towers is the model's output
    logits = net(*inputs(mixed)).asnumpy()
    np.testing.assert_allclose(net.score(T(user_a), T(item_b)).asnumpy(), logits, atol=1e-5)


SWITCHES = [dict(se=se, interaction=i, cir_weight=c, last_layer_only=last)
            for se, i, c, last in itertools.product(("lightse", "senet", "none"), ("fe", "dot", "fc"), (0.0, 0.5),
                                                    (False, True)) if not (last and i != "fe")]
SWITCHES += [dict(interaction="fe", fe_layers=f, fe_mean=mean, last_layer_only=last)
             for f, mean, last in (("outputs", False, False), ("inputs", True, False), ("all", True, False),
                                   ("inputs", False, True))]


@pytest.mark.parametrize("fe_layers, last, picked", [("outputs", False, (1, 2)), ("inputs", False, (0, 1)),
                                                     ("all", False, (0, 1, 2)), ("inputs", True, (1,))])
def test_fe_layers_pick_the_user_tower_representations(fe_layers, last, picked):
    """0 is the MLP input (Light-SE embeddings and dense values), k the output of MLP layer k."""
    net = M.build_model(META, SMALL.replace(fe_layers=fe_layers, last_layer_only=last))
    net.set_train(False)
    user_inputs = inputs(batch())[:net.n_user_inputs]
    reps = [r.asnumpy() for r in net.user_tower(*user_inputs)]
    assert [r.shape[1] for r in reps] == [2 * 4 + 1, 8, 6]  # 2 fields x 4 dims + 1 dense value, then the MLP
    heads = net.user_representation(*user_inputs).asnumpy()
    assert heads.shape == (6, len(picked), SMALL.heads, SMALL.head_dim)
    scale = 1 / (len(picked) * SMALL.heads)  # --fe_mean (the default): a mean over the user heads
    for l, i in enumerate(picked):
        np.testing.assert_allclose(heads[:, l].reshape(6, -1), scale * dense(net.fe.user_proj[l], reps[i]), atol=1e-6)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_every_switch_builds_runs_forward_and_backward(switches):
    cfg = SMALL.replace(**switches)
    net = M.build_model(META, cfg)
    loss_cell = M.LossCell(net)
    b = batch(8)
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(loss_cell, None, params)(*inputs(b), T(b["label"]))
    assert np.isfinite(loss.asnumpy()) and len(grads) == len(params)
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    n_params = M.describe(net)["parameters"]
    assert n_params == sum(int(np.prod(p.shape)) for p in params) > 0
    assert net.decoupled == (switches["interaction"] != "fc")
    assert net(*inputs(b)).shape == (8,)


def test_cir_term_is_in_the_loss():
    b = batch(8)
    with_cir = M.build_model(META, SMALL)
    ms.set_seed(0)
    without = M.build_model(META, SMALL.replace(cir_weight=0.0))
    ms.load_param_into_net(without, {p.name: p for p in with_cir.get_parameters()})
    with_cir.set_train(False)
    without.set_train(False)
    l1 = M.LossCell(with_cir)(*inputs(b), T(b["label"])).asnumpy()
    l0 = M.LossCell(without)(*inputs(b), T(b["label"])).asnumpy()
    logits, (u, v, _) = with_cir.forward(*inputs(b))  # the towers' last layers
    assert u.shape == v.shape == (8, SMALL.mlp[-1])
    cir = CIRLoss(SMALL.cir_tau)(u, v, T(b["label"])).asnumpy()
    np.testing.assert_allclose(l1 - l0, SMALL.cir_weight * cir, rtol=1e-4, atol=1e-6)


def test_cir_anchors_are_the_first_rows():
    cir = CIRLoss(0.3)
    u = RNG.normal(size=(6, 4)).astype(np.float32)
    v = RNG.normal(size=(6, 4)).astype(np.float32)
    y = np.array([1, 1, 0, 1, 1, 0], np.float32)
    un = u / np.linalg.norm(u, axis=1, keepdims=True)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    logits = un[:3] @ vn.T / 0.3  # 3 anchors against all 6 items
    per_row = np.log(np.exp(logits).sum(1)) - np.diag(logits[:, :3])
    expected = (per_row * y[:3]).sum() / y[:3].sum()
    np.testing.assert_allclose(cir(T(u[:3]), T(v), T(y[:3])).asnumpy(), expected, rtol=1e-5)


def test_model_cir_takes_its_anchors_from_the_first_rows():
    """IntTower.aux_loss with cir_anchors=k: the first k rows of the batch against all its items."""
    net = M.build_model(META, SMALL.replace(cir_anchors=3))
    net.set_train(False)
    b = batch(8)
    b["label"][:] = 1.0
    _, (u, v, ids) = net.forward(*inputs(b))
    y = T(b["label"])
    cir = CIRLoss(SMALL.cir_tau)
    got = float(net.aux_loss((u, v, ids), y).asnumpy())
    first = SMALL.cir_weight * float(cir(u[:3], v, y[:3]).asnumpy())
    last = SMALL.cir_weight * float(cir(u[-3:], v, y[-3:]).asnumpy())
    assert abs(first - last) > 1e-4  # the test can tell the two apart
    np.testing.assert_allclose(got, first, rtol=1e-5)


def test_linear_output_towers_end_without_relu_and_dropout():
    """--linear_output (the default): the towers' last layer is Dense -> BatchNorm (either sign); the others
    keep ReLU and Dropout; false gives the published non-negative outputs."""
    b = batch(8)
    relu = M.build_model(META, SMALL.replace(model="two_tower", dropout=0.1, linear_output=False))
    linear = M.build_model(META, SMALL.replace(model="two_tower", dropout=0.1))
    assert Config().linear_output
    for net in (relu, linear):
        net.set_train(False)
    (u0, v0, _), (u1, v1, _) = relu.forward(*inputs(b))[1], linear.forward(*inputs(b))[1]
    assert (u0.asnumpy() >= 0).all() and (v0.asnumpy() >= 0).all()
    assert (u1.asnumpy() < 0).any() and (v1.asnumpy() < 0).any()
    kinds = [[type(c).__name__ for c in layer.cell_list] for layer in linear.user_tower.mlp.layers]
    relus = [any(isinstance(c, nn.ReLU) or getattr(c, "relu", False) for c in layer.cell_list)  # in BatchNorm's kernel
             for layer in linear.user_tower.mlp.layers]
    assert relus[0] and "Dropout" in kinds[0]
    assert not relus[-1] and "Dropout" not in kinds[-1] and "BatchNorm" in kinds[-1]
    plain = M.build_model(META, SMALL.replace(model="two_tower", linear_output=True, output_batch_norm=False))
    last = plain.user_tower.mlp.layers[-1].cell_list
    assert [type(c).__name__ for c in last] == ["Dense"] and last[0].has_bias  # --output_batch_norm false
    assert "BatchNorm" in [type(c).__name__ for c in plain.user_tower.mlp.layers[0].cell_list]


def test_dssm_scores_the_scaled_cosine_of_linear_tower_outputs():
    """dssm: cos(u, v) times the learned scale (started at --cosine_scale) plus the bias; the index-side
    representations are unit vectors (the user's times the scale), scored as a dot product."""
    net = M.build_model(META, SMALL.replace(model="dssm", cosine_scale=3.0))
    net.set_train(False)
    b = batch(8)
    logits, (u, v, _) = net.forward(*inputs(b))
    u, v = u.asnumpy(), v.asnumpy()
    assert (u < 0).any() and (v < 0).any()  # linear last layers
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    np.testing.assert_allclose(logits.asnumpy(), 3.0 * cos + float(net.bias.asnumpy()), atol=1e-5)
    items = net.item_representation(*inputs(b)[net.n_user_inputs:]).asnumpy()
    np.testing.assert_allclose(np.linalg.norm(items, axis=-1), 1.0, rtol=1e-5)
    assert net.scoring == "dot" and net.decoupled and "log_scale" in [p.name for p in net.trainable_params()]


def test_two_tower_is_inttower_without_additions():
    net = M.build_model(META, SMALL.replace(model="two_tower"))
    assert net.interaction == "dot" and net.user_tower.attention is None and not net.has_aux


def test_out_of_range_ids_refused():
    b = batch()
    M.check_inputs(META, b)
    bad = dict(b, user_sparse=b["user_sparse"].copy())
    bad["user_sparse"][0, 0] = 11
    with pytest.raises(UserError, match="field user_id: id 11 is outside the model's vocabulary"):
        M.check_inputs(META, bad)
    bad = dict(b, item_genres=b["item_genres"] - 7)
    with pytest.raises(UserError, match="field genres"):
        M.check_inputs(META, bad)
