"""optim.fused: torch's fused SGD, Adam and AdamW over the simulated cluster's rows equal the same
optimizers per worker bit for bit, stay within float rounding of the default, are off unless asked,
are refused with a frozen second moment, and keep the simulated cluster equal to gloo workers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from asrbench.cluster.rows import RowBinding, build_worker_optimizer, row_parameters
from asrbench.errors import ConfigError
from asrbench.model.module import AcousticModule
from asrbench.model.optim import fused_option

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "strategies"))  # dist_utils, equivalence
from equivalence import NODES, case, check_equal, real_runs, simulated  # noqa: E402

DIM, WORKERS, STEPS = 8, 3, 12
MODEL = {"hidden_size": 20, "num_layers": 2}  # tensors of 29-3200 elements: some end off the vector width
OPTIMS = {"adam": {"name": "adam", "lr": 0.01},
          "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
          "adam_l2_warmup": {"name": "adam", "lr": 0.01, "weight_decay": 0.01, "warmup_steps": 4},
          "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}}


def _module(optim: dict) -> AcousticModule:
    torch.manual_seed(0)
    return AcousticModule(DIM, MODEL, optim, "ctc", world_size=WORKERS)


def _gradients(numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(WORKERS, numel, generator=gen) for _ in range(STEPS)]


def _rows(optim: dict) -> torch.Tensor:
    """The workers' parameters after STEPS steps of one optimizer over the rows of P (the cluster's)."""
    module = _module(optim)
    binding = RowBinding(module.model)
    P = binding.flat().expand(WORKERS, -1).clone()
    G = torch.zeros_like(P)
    rows = row_parameters(P)
    for row, grad in zip(rows, G.unbind(0)):
        row.grad = grad
    optimizer, schedulers = build_worker_optimizer(module, rows)
    for g in _gradients(binding.numel):
        G.copy_(g)
        optimizer.step()
        for config in schedulers:
            config.scheduler.step()
    return P


def _per_worker(optim: dict) -> torch.Tensor:
    """The same with one module and its own configure_optimizers per worker, as each gloo rank runs."""
    out = []
    for i in range(WORKERS):
        module = _module(optim)
        binding = RowBinding(module.model)
        optimizers, schedulers = module.configure_optimizers() if optim.get("warmup_steps") else (
            [module.configure_optimizers()], [])
        for g in _gradients(binding.numel):
            for p, v in zip(binding.params, binding.views(g[i])):
                p.grad = v.clone()
            optimizers[0].step()
            for s in schedulers:
                s["scheduler"].step()
        out.append(binding.flat())
    return torch.stack(out)


def _remainders(sizes: list[int], width: int = 16) -> torch.Tensor:
    """The last (size mod `width`) elements of each tensor laid end to end: where torch's CPU kernel
    steps one element at a time after its vector loop (16 floats wide at most, AVX512)."""
    mask = torch.zeros(sum(sizes), dtype=torch.bool)
    end = 0
    for size in sizes:
        end += size
        mask[end - size % width:end] = True
    return mask


@pytest.mark.parametrize("name", list(OPTIMS))
def test_fused_rows_equal_fused_optimizers_per_worker(name):
    """Bit for bit, but for the elements a worker's own tensor leaves to the kernel's scalar remainder
    (a row steps them in its vector loop; the two round apart by an ulp at times): those within 1e-6."""
    optim = OPTIMS[name] | {"fused": True}
    rows, workers = _rows(optim), _per_worker(optim)
    tail = _remainders(RowBinding(_module(optim).model).sizes)
    assert torch.equal(rows[:, ~tail], workers[:, ~tail])
    torch.testing.assert_close(rows[:, tail], workers[:, tail], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_fused_is_the_default_to_float_rounding(name):
    fused, default = _rows(OPTIMS[name] | {"fused": True}), _rows(OPTIMS[name])
    start = RowBinding(_module(OPTIMS[name]).model).flat()
    assert (default - start).abs().max() > 1e-2  # trained
    assert not torch.equal(fused, default) or name == "sgd"  # another kernel: some elements round otherwise
    torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)


def test_off_unless_asked():
    for optim in ({"name": "adam", "lr": 0.01}, {"name": "adam", "lr": 0.01, "fused": False}):
        assert _module(optim).configure_optimizers().defaults["fused"] is None  # torch's default, as before
    assert _module({"name": "adam", "lr": 0.01, "fused": True}).configure_optimizers().defaults["fused"] is True
    assert _module({"name": "sgd", "lr": 0.01, "fused": True}).configure_optimizers().defaults["fused"] is True


@pytest.mark.parametrize("optim, words", [
    ({"name": "adam", "lr": 0.01, "fused": True, "freeze_variance_after": 6},
     "optim.fused=true does not apply to Adam with a frozen second moment"),
    ({"name": "adamw", "lr": 0.01, "fused": True, "freeze_variance_after": 6}, "set optim.fused=false"),
    ({"name": "adam", "lr": 0.01, "fused": "yes"}, "optim.fused='yes' is not allowed; use true or false"),
])
def test_bad_combinations_are_refused_in_one_line(optim, words):
    with pytest.raises(ConfigError) as err:
        _module(optim).configure_optimizers()
    assert words in str(err.value) and "\n" not in str(err.value)


def test_frozen_adam_without_fused_is_unchanged():
    assert fused_option({"name": "adam", "freeze_variance_after": 6}) is None
    assert fused_option({"name": "sgd", "fused": True, "freeze_variance_after": 6}) is True  # read by Adam alone


CASES = {"sync_fused": case({"name": "sync"}, fused=True),
         "bmuf_fused": case({"name": "bmuf", "block_size": 4}, fused=True)}


@pytest.mark.slow
def test_fused_simulated_cluster_equals_fused_gloo_workers():
    """Both paths read optim.fused where configure_optimizers builds the optimizer: equal at the
    strategy's equivalence_tolerance, as the default is (tests/cluster/test_simulated.py)."""
    real = real_runs(CASES)
    for name, c in CASES.items():
        sim = simulated(c)
        assert sim["cluster"].optimizer.defaults["fused"] is True
        check_equal(sim, [r[name] for r in real], name)
    assert len(real) == NODES
