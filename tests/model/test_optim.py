"""FrozenVarianceAdam: Adam itself up to the freeze, its equations after, linear in the gradient
once frozen (why error feedback carries over), and a checkpoint round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from asrbench.model.optim import FrozenVarianceAdam

BETAS, EPS = (0.9, 0.999), 1e-8


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)] for _ in range(steps)]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("decoupled", [False, True])
def test_equals_torch_adam_bit_for_bit_until_the_freeze(decoupled):
    grads = _grads(5)
    ref, ours = _params(), _params()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    _run(cls(ref, lr=0.01, weight_decay=0.1, foreach=False), ref, grads)
    _run(FrozenVarianceAdam(ours, lr=0.01, weight_decay=0.1, freeze_after=5, decoupled_weight_decay=decoupled),
         ours, grads)
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))


@pytest.mark.parametrize("decoupled", [False, True])
def test_after_the_freeze_v_stays_and_the_step_follows_the_equations(decoupled):
    lr, wd, frozen = 0.01, 0.05, 3
    params = _params()
    opt = FrozenVarianceAdam(params, lr=lr, weight_decay=wd, freeze_after=frozen, decoupled_weight_decay=decoupled)
    grads = _grads(6)
    _run(opt, params, grads[:frozen])
    v = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    m = [opt.state[p]["exp_avg"].clone() for p in params]
    theta = [p.detach().clone() for p in params]
    assert all(opt.denominator(p) is not None for p in params)
    for t in range(frozen + 1, 7):
        _run(opt, params, [grads[t - 1]])
        for i, p in enumerate(params):
            g = grads[t - 1][i]
            if decoupled:
                theta[i] = theta[i] * (1 - lr * wd)
            else:
                g = g + wd * theta[i]
            m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * g
            denom = (v[i] / (1 - BETAS[1] ** frozen)).sqrt() + EPS
            theta[i] = theta[i] - lr * (m[i] / (1 - BETAS[0] ** t)) / denom
            assert torch.equal(opt.state[p]["exp_avg_sq"], v[i])  # frozen
            assert int(opt.state[p]["step"]) == t
            torch.testing.assert_close(p.detach(), theta[i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(opt.denominator(p), denom, rtol=1e-6, atol=0)


def _moved(make, grads):
    """Parameter change over `grads` after 4 warm-up steps with `make(params)`."""
    params = _params()
    opt = make(params)
    _run(opt, params, _grads(4, seed=7))
    before = [p.detach().clone() for p in params]
    _run(opt, params, grads)
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])


@pytest.mark.parametrize("name", ["frozen", "adam"])
def test_frozen_steps_are_linear_in_the_gradient_and_adam_steps_are_not(name):
    """Change(a + 2b) = change(a) + 2 change(b) - 2 change(0) (momentum left from the warm-up): the
    parameters move by a linear function of the gradients, which is what lets error feedback's
    delayed sums reach them as the dense gradients would."""
    make = {"frozen": lambda ps: FrozenVarianceAdam(ps, lr=0.01, freeze_after=4),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.01)}[name]
    a, b = _grads(3, seed=2), _grads(3, seed=3)
    mixed = [[x + 2 * y for x, y in zip(sa, sb)] for sa, sb in zip(a, b)]
    zero = [[torch.zeros_like(x) for x in step] for step in a]
    got = _moved(make, mixed)
    expected = _moved(make, a) + 2 * _moved(make, b) - 2 * _moved(make, zero)
    error = float((got - expected).norm() / expected.norm())
    if name == "frozen":
        assert error < 1e-5
    else:
        assert error > 0.1


def test_checkpoint_round_trip_and_before_freeze_has_no_denominator():
    params = _params()
    opt = FrozenVarianceAdam(params, lr=0.01, freeze_after=3)
    assert opt.denominator(params[0]) is None
    _run(opt, params, _grads(4))
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint file holds it (load_state_dict shares tensors)
    clone = _params()
    for p, q in zip(clone, params):
        p.data.copy_(q.data)
    restored = FrozenVarianceAdam(clone, lr=0.01, freeze_after=3)
    restored.load_state_dict(state)
    more = _grads(2, seed=5)
    _run(opt, params, more)
    _run(restored, clone, more)
    assert all(torch.equal(a, b) for a, b in zip(params, clone))
    with pytest.raises(KeyError):
        opt.denominator(torch.zeros(1))


def test_bad_freeze_is_refused():
    with pytest.raises(ValueError, match="freeze_after"):
        FrozenVarianceAdam(_params(), freeze_after=0)


def _cfg(optim: dict, strategy: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create({"optim": {"name": "adam", "lr": 1e-3, "freeze_variance_after": None} | optim,
                             "strategy": strategy})


def test_the_worker_optimizer_freezes_at_the_end_of_the_dense_warm_up_for_rms_units():
    from asrbench.experiment import inner_optim

    rms = {"name": "gtc", "tau_units": "rms"}
    assert inner_optim(_cfg({}, rms | {"dense_warmup_steps": 50}))["freeze_variance_after"] == 50
    assert inner_optim(_cfg({}, {"name": "gtc", "dense_warmup_steps": 50}))["freeze_variance_after"] is None
    assert inner_optim(_cfg({}, {"name": "gtc", "dense_warmup_steps": 0}))["freeze_variance_after"] is None
    assert inner_optim(_cfg({"freeze_variance_after": 20}, {"name": "gtc", "dense_warmup_steps": 50,
                                                           "tau_units": "rms"}))["freeze_variance_after"] == 20


@pytest.mark.parametrize("optim, strategy, named", [
    ({"name": "sgd"}, {"dense_warmup_steps": 10}, "optim.name"),
    ({}, {"dense_warmup_steps": 0}, "dense_warmup_steps"),
    ({"freeze_variance_after": 30}, {"dense_warmup_steps": 10}, "freeze_variance_after"),
    ({}, {"dense_warmup_steps": 10, "reset_momentum": True}, "reset_momentum"),
])
def test_rms_units_without_a_frozen_adam_is_a_config_error(optim, strategy, named):
    from asrbench.errors import ConfigError
    from asrbench.experiment import inner_optim

    with pytest.raises(ConfigError, match=named):
        inner_optim(_cfg(optim, {"name": "gtc", "tau_units": "rms"} | strategy))


def test_step_wise_lr_decay_spreads_the_epoch_decay_evenly_and_meets_it_at_each_epoch_end():
    from asrbench.cluster.simulated import build_worker_optimizer, row_parameters
    from asrbench.model.module import AcousticModule

    optim = {"name": "adam", "lr": 0.01, "lr_decay_per_epoch": 0.5}
    smooth = AcousticModule(4, {"hidden_size": 3, "num_layers": 1}, optim | {"lr_decay_interval": "step"}, "ctc")
    jumps = AcousticModule(4, {"hidden_size": 3, "num_layers": 1}, optim, "ctc")
    smooth.steps_per_epoch = 4
    for opt, scheds in (build_worker_optimizer(smooth, list(smooth.parameters())),  # the module's own path
                        build_worker_optimizer(smooth, row_parameters(torch.zeros(2, 5)))):  # the simulated rows
        (config,) = scheds
        assert config.interval == "step"
        lrs = []
        for _ in range(8):
            opt.step()
            config.scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert lrs == pytest.approx([0.01 * 0.5 ** (k / 4) for k in range(1, 9)], rel=1e-12)
    opt, (config,) = build_worker_optimizer(jumps, list(jumps.parameters()))
    assert config.interval == "epoch"
    opt.step()
    config.scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[3])  # one epoch: the same lr either way
    unset = AcousticModule(4, {"hidden_size": 3, "num_layers": 1}, optim | {"lr_decay_interval": "step"}, "ctc")
    opt, (config,) = build_worker_optimizer(unset, list(unset.parameters()))
    opt.step()
    with pytest.raises(RuntimeError, match="steps_per_epoch"):
        config.scheduler.step()
