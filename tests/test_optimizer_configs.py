"""Optimizer configurations the golden trajectories do not reach, against a live server.

Validation errors must be INVALID_ARGUMENT and name the offending key; the config flavours
(legacy / Keras 2.11+ / Keras 3 / TF1 / tfa) must be recognised from their keys; non-slot state
(TF1 beta powers, Keras 3 learning rate) must round-trip through get_weights / set_weights.
"""
import json
import pathlib

import numpy as np
import pytest

import sparseps

KERAS3 = json.loads((pathlib.Path(__file__).parent / "golden" / "keras3_configs.json").read_text())["optimizers"]

LAZY = {"module": "tensorflow_addons.optimizers.lazy_adam", "class_name": "LazyAdam",
        "config": {"name": "LazyAdam", "learning_rate": 0.001, "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999,
                   "epsilon": 1e-07, "amsgrad": False}, "registered_name": "Addons>LazyAdam"}
KERAS2_ADAM = {"name": "Adam", "weight_decay": None, "clipnorm": None, "global_clipnorm": None, "clipvalue": None,
               "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None, "jit_compile": False,
               "is_legacy_optimizer": False, "learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999,
               "epsilon": 1e-07, "amsgrad": False}


def rejects(client, name, config, *words):
    """create_optimizer fails with INVALID_ARGUMENT and every word appears in the message."""
    with pytest.raises(sparseps.InvalidArgument) as e:
        client.create_optimizer(name, config)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
    return str(e.value)


# ---------------------------------------------------------------- errors name the key
@pytest.mark.parametrize("config, key", [
    ({"class_name": "LazyAdam", "config": {"learning_rte": 0.01}}, "learning_rte"),
    ({"class_name": "Adam", "config": {"beta_1": "0.9"}}, "beta_1"),
    ({"class_name": "Adam", "config": {"amsgrad": "yes"}}, "amsgrad"),
    ({"class_name": "Adam", "config": {"epsilon": [1e-7]}}, "epsilon"),
    ({"class_name": "SGD", "config": {"momentum": 1.5}}, "momentum"),
    ({"class_name": "SGD", "config": {"nesterov": 1}}, "nesterov"),
    ({"class_name": "Addons>RectifiedAdam", "config": {"total_steps": 2.5}}, "total_steps"),
    ({"class_name": "Addons>RectifiedAdam", "config": {"sma_threshold": None}}, "sma_threshold"),
    ({"class_name": "Addons>RectifiedAdam", "config": {"weight_decay": "0.01"}}, "weight_decay"),
    ({"class_name": "Addons>Lookahead", "config": {"optimizer": LAZY, "sync_period": 0}}, "sync_period"),
    ({"class_name": "Addons>Lookahead", "config": {"optimizer": LAZY, "slow_step_size": "half"}}, "slow_step_size"),
    ({"class_name": "Addons>Lookahead", "config": {"sync_period": 6}}, "optimizer"),
    ({"class_name": "Addons>Lookahead", "config": {"optimizer": 3}}, "optimizer"),
    ({"class_name": "LazyAdamOptimizer", "config": {"beta1": True}}, "beta1"),
    ({"class_name": "LazyAdamOptimizer", "config": {"clipnorm": 1.0}}, "clipnorm"),
    ({"class_name": "LazyAdam", "config": {"clipvalue": -1.0}}, "clipvalue"),
    ({"class_name": "LazyAdam", "config": {"learning_rate": {"class_name": "NoSuchDecay", "config": {}}}},
     "NoSuchDecay"),
    ({"class_name": "LazyAdam", "config": {"learning_rate": {"class_name": "ExponentialDecay",
                                                             "config": {"initial_learning_rate": 0.1}}}},
     "decay_steps"),
    ({"class_name": "Adam", "config": dict(KERAS2_ADAM, jit_compile="no")}, "jit_compile"),
    ({"class_name": "Adam", "config": dict(KERAS2_ADAM, weight_decay="0.1")}, "weight_decay"),
])
def test_bad_value_names_the_key(client, unique, config, key):
    rejects(client, f"{unique}_o", config, "INVALID_ARGUMENT", key)


def test_unknown_class(client, unique):
    rejects(client, f"{unique}_o", {"class_name": "Adadelta", "config": {}}, "Adadelta", "supported")


def test_clipnorm_and_global_clipnorm_are_exclusive(client, unique):
    for config in ({"class_name": "LazyAdam", "config": {"clipnorm": 1.0, "global_clipnorm": 1.0}},
                   {"class_name": "Adam", "config": dict(KERAS2_ADAM, clipnorm=1.0, global_clipnorm=1.0)},
                   {"class_name": "Addons>Lookahead",
                    "config": {"optimizer": LAZY, "clipnorm": 1.0, "global_clipnorm": 1.0}}):
        rejects(client, f"{unique}_o", config, "clipnorm", "global_clipnorm")
    # Keras 3 accepts only one of the three
    k3 = dict(KERAS3["adam_default"]["get_config"], clipnorm=1.0, clipvalue=0.5)
    rejects(client, f"{unique}_o", {"class_name": "Adam", "config": k3}, "clipnorm", "clipvalue")


# ---------------------------------------------------------------- Keras 2.11+ / Keras 3 options
@pytest.mark.parametrize("key, value", [("use_ema", True), ("gradient_accumulation_steps", 4),
                                        ("loss_scale_factor", 128.0)])
def test_keras3_unimplemented_options_are_refused(client, unique, key, value):
    config = dict(KERAS3["adam_default"]["get_config"], **{key: value})
    rejects(client, f"{unique}_o", {"class_name": "Adam", "config": config}, "INVALID_ARGUMENT", key)


def test_keras2_use_ema_is_refused(client, unique):
    rejects(client, f"{unique}_o", {"class_name": "Adam", "config": dict(KERAS2_ADAM, use_ema=True)}, "use_ema")


@pytest.mark.parametrize("key, value", [("lr", 0.01), ("decay", 0.01)])
def test_new_keras_refuses_legacy_kwargs(client, unique, key, value):
    rejects(client, f"{unique}_o", {"class_name": "Adam", "config": dict(KERAS2_ADAM, **{key: value})}, repr(key))


def test_keras3_configs_recognised_and_round_trip(client, unique):
    """The real Keras 3 serialize() output (defaults and nulls included) is accepted as is."""
    for case in ("adam_default", "adam_amsgrad_wd", "sgd_momentum_nesterov", "adam_expdecay"):
        ser = KERAS3[case]["serialize"]
        opt = client.create_optimizer(f"{unique}_{case}", ser)
        assert opt.class_name == ser["class_name"]
        assert opt.get_config() == KERAS3[case]["get_config"], case
    rejects(client, f"{unique}_ema", KERAS3["adam_use_ema"]["serialize"], "use_ema")


def test_keras2_config_round_trip(client, unique):
    opt = client.create_optimizer(f"{unique}_o", {"class_name": "Adam", "config": dict(KERAS2_ADAM, amsgrad=True)})
    cfg = opt.get_config()
    assert cfg["is_legacy_optimizer"] is False and cfg["amsgrad"] is True
    assert set(cfg) == set(KERAS2_ADAM)
    # a legacy config is still the legacy class, also with an explicit is_legacy_optimizer: true
    legacy = client.create_optimizer(f"{unique}_l", {"class_name": "Adam", "config": {"is_legacy_optimizer": True}})
    assert "is_legacy_optimizer" not in legacy.get_config() and legacy.get_config()["decay"] == 0.0


def test_keras2_adam_slots_interleave_per_variable(client, unique):
    client.create_optimizer(f"{unique}_o", {"class_name": "Adam", "config": dict(KERAS2_ADAM, amsgrad=True)})
    a = client.create_variable(f"{unique}_a", initial_value=np.ones((4, 2), np.float32), optimizer=f"{unique}_o")
    b = client.create_variable(f"{unique}_b", initial_value=np.ones((3,), np.float32), optimizer=f"{unique}_o")
    client.push({a.name: np.ones((4, 2), np.float32), b.name: np.ones(3, np.float32)})
    shapes = [np.shape(w) for w in client.optimizer(f"{unique}_o").get_weights()]
    assert shapes == [(), (4, 2), (4, 2), (3,), (3,), (4, 2), (3,)]   # iter, m(a), v(a), m(b), v(b), vhat...


def test_keras3_learning_rate_is_a_weight(client, unique):
    """Keras 3 lists the learning-rate variable in get_weights(); setting it changes the steps."""
    client.create_optimizer(f"{unique}_o", KERAS3["sgd_momentum_nesterov"]["serialize"])
    opt = client.optimizer(f"{unique}_o")
    w = client.create_variable(f"{unique}_w", initial_value=np.ones((5, 2), np.float32), optimizer=opt.name)
    client.push({w.name: (np.array([1, 1, 3]), np.full((3, 2), 0.5, np.float32))})
    weights = opt.get_weights()
    assert [np.shape(x) for x in weights] == [(), (), (5, 2)]
    assert int(weights[0]) == 1 and weights[1] == np.float32(0.01)
    before = client.pull(w.name)
    weights[1] = np.float32(0.0)
    weights[2] = np.zeros((5, 2), np.float32)
    opt.set_weights(weights)
    client.push({w.name: (np.array([0, 2]), np.ones((2, 2), np.float32))})
    np.testing.assert_array_equal(client.pull(w.name), before)   # lr 0 and momentum 0: nothing moves
    assert opt.get_config()["learning_rate"] == 0.0


# ---------------------------------------------------------------- TF1 LazyAdamOptimizer
def test_tf1_beta_powers_are_the_weights(client, unique):
    client.create_optimizer(f"{unique}_o", {"class_name": "LazyAdamOptimizer", "config": {"learning_rate": 0.01}})
    opt = client.optimizer(f"{unique}_o")
    emb = client.create_variable(f"{unique}_emb", initial_value=np.zeros((6, 2), np.float32), optimizer=opt.name)
    for _ in range(2):
        client.push({emb.name: (np.array([4, 1, 4]), np.ones((3, 2), np.float32))})
    b1, b2 = np.float32(0.9), np.float32(0.999)
    assert opt.nonslot() == {"beta1_power": float(b1 * b1 * b1), "beta2_power": float(b2 * b2 * b2)}
    weights = opt.get_weights()   # beta1_power, beta2_power, <emb>/Adam (m), <emb>/Adam_1 (v): no iterations
    assert [np.shape(x) for x in weights] == [(), (), (6, 2), (6, 2)]
    assert weights[0] == b1 * b1 * b1
    np.testing.assert_array_equal(weights[2][[0, 2, 3, 5]], 0)   # lazy: untouched rows keep m = 0
    weights[0], weights[1] = np.float32(0.5), np.float32(0.25)
    opt.set_weights(weights)
    assert opt.nonslot() == {"beta1_power": 0.5, "beta2_power": 0.25}
    assert opt.get_config()["epsilon"] == 1e-8


# ---------------------------------------------------------------- Lookahead
def test_lookahead_refuses_non_legacy_inner(client, unique):
    for inner in ({"class_name": "Adam", "config": KERAS2_ADAM}, KERAS3["adam_default"]["serialize"],
                  {"class_name": "LazyAdamOptimizer", "config": {}},
                  {"class_name": "Addons>Lookahead", "config": {"optimizer": LAZY}}):
        rejects(client, f"{unique}_o", {"class_name": "Addons>Lookahead", "config": {"optimizer": inner}},
                "optimizer", "legacy")


def test_lookahead_refuses_ignored_wrapper_kwargs(client, unique):
    rejects(client, f"{unique}_o", {"class_name": "Addons>Lookahead", "config": {"optimizer": LAZY, "lr": 0.1}}, "'lr'")
    rejects(client, f"{unique}_o", {"class_name": "Addons>Lookahead", "config": {"optimizer": LAZY, "decay": 0.1}},
            "'decay'")


def test_lookahead_config_nests_the_inner_optimizer(client, unique):
    inner = {"class_name": "SGD", "config": {"learning_rate": 0.1, "momentum": 0.9}}
    opt = client.create_optimizer(f"{unique}_o", {"class_name": "Lookahead",
                                                  "config": {"optimizer": inner, "clipnorm": 0.5}})
    cfg = opt.get_config()
    assert cfg["name"] == "Lookahead" and cfg["clipnorm"] == 0.5
    assert cfg["sync_period"] == 6 and cfg["slow_step_size"] == 0.5
    assert cfg["optimizer"] == {"module": "keras.optimizers.legacy", "class_name": "SGD",
                                "config": {"name": "SGD", "learning_rate": 0.1, "decay": 0.0, "momentum": 0.9,
                                           "nesterov": False}, "registered_name": None}
    assert opt.get_slot_names() == ["slow", "momentum"]
    # a string names the inner class with its defaults
    opt2 = client.create_optimizer(f"{unique}_s", {"class_name": "Lookahead", "config": {"optimizer": "LazyAdam"}})
    assert opt2.get_config()["optimizer"]["registered_name"] == "Addons>LazyAdam"


def test_lookahead_slow_starts_at_the_value_of_a_late_variable(client, unique):
    """slow is created from the variable when it first gets a gradient (tfa >= 0.13), not zeros."""
    client.create_optimizer(f"{unique}_o", {"class_name": "Lookahead",
                                            "config": {"optimizer": LAZY, "sync_period": 3}})
    opt = client.optimizer(f"{unique}_o")
    a = client.create_variable(f"{unique}_a", initial_value=np.ones((4, 2), np.float32), optimizer=opt.name)
    b0 = np.arange(8, dtype=np.float32).reshape(4, 2) + 1
    b = client.create_variable(f"{unique}_b", initial_value=b0, optimizer=opt.name)
    client.push({a.name: np.ones((4, 2), np.float32)})                       # t=1
    client.push({b.name: (np.array([2]), np.ones((1, 2), np.float32))})      # t=2: b's slots appear
    np.testing.assert_array_equal(opt.get_slot(b.name, "slow"), b0)
    moved = client.pull(b.name)
    assert not np.array_equal(moved[2], b0[2])
    client.push({b.name: (np.array([1]), np.ones((1, 2), np.float32))})      # t=3: sync, slow = b0 + 0.5 (b - b0)
    slow, fast = opt.get_slot(b.name, "slow"), client.pull(b.name)
    np.testing.assert_array_equal(slow, fast)
    np.testing.assert_array_equal(fast[[0, 3]], b0[[0, 3]])                  # never-touched rows stay put
    assert np.all(fast[1:3] != b0[1:3])
    weights = opt.get_weights()   # iterations, slow(a), slow(b), m(a), m(b), v(a), v(b)
    assert int(weights[0]) == 3 and len(weights) == 7
    np.testing.assert_array_equal(weights[2], slow)


# ---------------------------------------------------------------- RectifiedAdam and legacy details
def test_radam_config_defaults_and_int_total_steps(client, unique):
    opt = client.create_optimizer(f"{unique}_o", {"class_name": "RectifiedAdam", "config": {"total_steps": 30.0,
                                                                                            "epsilon": None}})
    cfg = opt.get_config()
    assert cfg["total_steps"] == 30 and isinstance(cfg["total_steps"], int)
    assert cfg["epsilon"] == 1e-7   # `epsilon or backend.epsilon()`
    assert set(cfg) == {"name", "learning_rate", "beta_1", "beta_2", "decay", "weight_decay", "sma_threshold",
                        "epsilon", "amsgrad", "total_steps", "warmup_proportion", "min_lr"}


def test_radam_weight_decay_schedule_round_trips(client, unique):
    wd = {"module": "keras.optimizers.schedules", "class_name": "InverseTimeDecay",
          "config": {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.5, "staircase": False,
                     "name": None}, "registered_name": None}
    opt = client.create_optimizer(f"{unique}_o", {"class_name": "Addons>RectifiedAdam",
                                                  "config": {"weight_decay": wd}})
    assert opt.get_config()["weight_decay"] == wd


def test_legacy_epsilon_zero_means_keras_epsilon(client, unique):
    opt = client.create_optimizer(f"{unique}_o", {"class_name": "LazyAdam", "config": {"epsilon": 0}})
    assert opt.get_config()["epsilon"] == 1e-7
