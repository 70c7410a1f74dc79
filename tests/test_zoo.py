"""The comparison models: built from meta.json, trained by the same loop, decoupled ones as towers."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import get_dataset
import model as M
import runtime
from model_config import MODELS, Config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = Config(dataset="synthetic", data_dir=str(tmp_path_factory.mktemp("zoo")), synthetic_users=300,
                 synthetic_items=120, synthetic_ratings=30, embed_dim=8, mlp=(32, 16), heads=2, head_dim=8,
                 dropout=0.0, batch_size=128)
    runtime.init_mindspore(cfg)
    return cfg, get_dataset.load_dataset(cfg, quiet=True)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_with_falling_loss(name, data):
    cfg, dataset = data
    cfg = cfg.replace(model=name)
    ms.set_seed(0)
    meta, arrays = dataset.meta, dataset.arrays("train")
    model = M.build_model(meta, cfg)
    step = nn.TrainOneStepCell(M.LossCell(model), nn.Adam(model.trainable_params(), learning_rate=0.01))
    step.set_train(True)
    names = meta["inputs"] + ["label"]
    losses = [float(step(*b).asnumpy()) for epoch in range(3)
              for b in runtime.batches(arrays, names, cfg.batch_size, runtime.epoch_order(0, epoch, len(arrays["label"])))]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), (name, losses[:5], losses[-5:])
    probs = runtime.predict(model, dataset.arrays("test"), meta["inputs"], 512)
    assert probs.shape == (len(dataset.arrays("test")["label"]),) and ((probs > 0) & (probs < 1)).all()


@pytest.mark.parametrize("name", ["inttower", "two_tower", "dssm", "dat"])
def test_decoupled_models_score_from_their_towers(name, data):
    cfg, dataset = data
    meta = dataset.meta
    model = M.build_model(meta, cfg.replace(model=name))
    assert model.decoupled
    model.set_train(False)
    test = dataset.arrays("test")
    inputs = [ms.Tensor(test[k][:50]) for k in meta["inputs"]]
    user = model.user_representation(*inputs[:model.n_user_inputs])
    item = model.item_representation(*inputs[model.n_user_inputs:])
    np.testing.assert_allclose(model.score(user, item).asnumpy(), model(*inputs).asnumpy(), atol=1e-5)


def test_coupled_models_say_so(data):
    cfg, dataset = data
    for name in ("lr", "cold", "wide_deep", "deepfm", "dcn", "autoint"):
        assert not M.build_model(dataset.meta, cfg.replace(model=name)).decoupled


def test_dat_mimic_loss_only_for_clicks(data):
    cfg, dataset = data
    model = M.build_model(dataset.meta, cfg.replace(model="dat", dat_weight=1.0))
    model.set_train(False)
    test = dataset.arrays("test")
    inputs = [ms.Tensor(test[k][:40]) for k in dataset.meta["inputs"]]
    _, extras = model.forward(*inputs)
    user, item, ua, ia = (e.asnumpy() for e in extras)
    y = test["label"][:40]
    expected = (((ua - item) ** 2).sum(-1) + ((ia - user) ** 2).sum(-1)) * y
    np.testing.assert_allclose(model.aux_loss(extras, ms.Tensor(y)).asnumpy(), expected.mean(), rtol=1e-4)
    assert float(model.aux_loss(extras, ms.Tensor(np.zeros(40, np.float32))).asnumpy()) == 0.0


def test_dat_mimic_loss_stops_the_gradient_into_the_towers(data):
    """The mimic loss moves only the augmented vectors: sg(p_v) and sg(p_u) keep its gradient out of both
    towers' MLPs (without the stop-gradients it would pull each tower towards the other's vector)."""
    cfg, dataset = data
    model = M.build_model(dataset.meta, cfg.replace(model="dat", dat_weight=1.0))
    model.set_train(False)
    test = dataset.arrays("test")
    inputs = [ms.Tensor(test[k][:64]) for k in dataset.meta["inputs"]]
    y = ms.Tensor(np.ones(64, np.float32))
    towers = [p for p in model.trainable_params() if ".mlp." in p.name]
    augment = [p for p in model.trainable_params() if "augment" in p.name]
    assert towers and augment

    def mimic(*x):
        return model.aux_loss(model.forward(*x)[1], y)
    tower_grads = ms.grad(mimic, grad_position=None, weights=towers)(*inputs)
    assert all(float(np.abs(g.asnumpy()).max()) == 0.0 for g in tower_grads)
    augment_grads = ms.grad(mimic, grad_position=None, weights=augment)(*inputs)
    assert any(float(np.abs(g.asnumpy()).max()) > 0.0 for g in augment_grads)
