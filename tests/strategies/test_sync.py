"""Sync SGD (Lightning's DDPStrategy) with byte accounting, and the failure naming every strategy shares."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from dist_utils import free_port, run_workers_outcomes
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from asrbench.strategies.gtc import GTCStrategy
from asrbench.strategies.sync import SyncStrategy

CONF = Path(__file__).resolve().parents[2] / "conf" / "strategy"


def test_strategies_are_registered_by_name():
    assert isinstance(StrategyRegistry.get("asrbench_sync"), SyncStrategy)
    assert isinstance(StrategyRegistry.get("asrbench_gtc"), GTCStrategy)


@pytest.mark.parametrize("name, cls", [("sync", SyncStrategy), ("gtc", GTCStrategy)])
def test_config_keys_are_exactly_init_keywords(name, cls):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert cfg.pop("name") == name
    assert set(cfg) <= set(inspect.signature(cls.__init__).parameters)
    cls(**cfg)


def test_seconds_are_accepted_as_the_collective_timeout():
    assert SyncStrategy(timeout=12)._timeout.total_seconds() == 12
    with pytest.raises(ValueError, match="timeout"):
        SyncStrategy(timeout=0)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.log_dict({f"comm/{k}": v for k, v in self.trainer.strategy.comm_metrics().items()}, on_step=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 6, generator=gen), torch.randn(64, 2, generator=gen)),
                          batch_size=8)


class SummaryProbe(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        """Rank 0 bumps a weight; rank 1 must not see it (each worker owns its weights)."""
        weight = next(pl_module.parameters())
        trainer.strategy.barrier()
        before = float(weight.view(-1)[0])
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            with torch.no_grad():
                weight.view(-1)[0] += 1.0
        trainer.strategy.barrier()
        seen = float(weight.view(-1)[0]) - before
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            with torch.no_grad():
                weight.view(-1)[0] -= 1.0
        torch.save(seen, self.path / f"seen_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        torch.save(trainer.strategy.comm_summary(), self.path / f"summary_rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_sync_counts_one_dense_all_reduce_per_step_and_workers_own_their_weights(tmp_path: Path):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=SyncStrategy(start_method="forkserver", timeout=20),
                         max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[SummaryProbe(tmp_path)])
    trainer.fit(Tiny())
    grad_bytes = 4 * sum(p.numel() for p in Tiny().parameters())
    assert float(trainer.callback_metrics["comm/bytes_sent"]) == grad_bytes  # 2 (N-1)/N = 1 for N = 2
    assert torch.load(tmp_path / "seen_rank1.pt") == 0.0  # not shared memory (Lightning unshares for spawn only)
    for rank in range(2):
        s = torch.load(tmp_path / f"summary_rank{rank}.pt")
        assert s["steps"] == 8  # 64 samples / 2 workers / 8 per batch x 2 epochs
        assert s["bytes_sent_per_worker_per_step"] == s["bytes_received_per_worker_per_step"] == grad_bytes
        assert s["dense_bytes_per_worker_per_step"] == grad_bytes
        assert s["compression_ratio"] == 1.0 and s["density"] == 1.0


def _plain_ddp_peer_raises(rank: int, world: int) -> str:
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 2))
    strategy = SyncStrategy()
    for step in range(3):
        if rank == 1 and step == 1:
            raise ValueError("injected failure")
        try:
            model(torch.randn(3, 4)).sum().backward()
        except RuntimeError as err:
            strategy.on_exception(err)  # what Lightning does with an exception in fit
            return str(err)
    return "no error"


@pytest.mark.slow
def test_a_dense_all_reduce_that_loses_a_peer_names_the_rank():
    outcomes = run_workers_outcomes(_plain_ddp_peer_raises, 2, timeout=30, collective_timeout_s=5)
    assert outcomes[0].ok and "rank 1 raised ValueError: injected failure" in outcomes[0].value
    assert not outcomes[1].ok and "injected failure" in outcomes[1].error


# The launched run ends within its collective timeout, the wait for the peers' answers and an
# allowance for starting it: the script, and the copy Lightning launches for rank 1, each import
# torch and Lightning (about 10 s on a loaded 2-core machine) before the failing step.
SCRIPT_TIMEOUT_S = 10  # the script's collective timeout
ANSWER_WAIT_S = 3  # asrbench.strategies.comm.collective_error's wait for every peer to answer
LAUNCH_ALLOWANCE_S = 90
SCRIPT = """
import os, sys
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from asrbench.strategies.sync import SyncStrategy

class Failing(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1 and self.global_step == 2:
            {failure}
        return self.net(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)

if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=SyncStrategy(timeout={timeout}), max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Failing())
"""


@pytest.mark.slow
@pytest.mark.parametrize("failure, expected", [('raise ValueError("injected failure")',
                                                "rank 1 raised at step 2 ValueError: injected failure")])
def test_launched_run_stops_naming_the_rank_that_raised(tmp_path: Path, failure, expected):
    """The default launcher (one script per rank, rank 0 in the main process), as `asrbench train` runs.
    Ranks that die or hang are named the same way (tests/strategies/test_gtc.py, via dist_utils)."""
    script = tmp_path / "failing_run.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("{failure}", failure)
                      .replace("{timeout}", str(SCRIPT_TIMEOUT_S)))
    bound = SCRIPT_TIMEOUT_S + ANSWER_WAIT_S + LAUNCH_ALLOWANCE_S
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=bound + 30, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert time.monotonic() - t0 < bound
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]


class _DeadChild:
    """A launched worker process that has exited with status 1."""
    pid, returncode = 12345, 1

    def poll(self) -> int:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        pass


def test_the_launchers_watcher_names_what_a_dead_rank_raised(tmp_path: Path, monkeypatch, capsys):
    """Lightning's watcher may see rank 1 exit before rank 0's own collective fails (a loaded machine
    slows rank 0): its line then carries the exception rank 1 published, not only the exit status."""
    import torch.distributed as dist

    from asrbench.strategies import comm

    def _exit(code: int):
        raise SystemExit(code)

    monkeypatch.setattr(comm.os, "_exit", _exit)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        watcher = comm.NamingObserver(main_pid=os.getpid(), child_processes=[_DeadChild()], node_rank=0,
                                      num_processes=2)
        with pytest.raises(SystemExit, match="2"):
            watcher._run()
        assert capsys.readouterr().err.strip() == "error: rank 1 exited with status 1"  # nothing published
        dist.distributed_c10d._get_default_store().set(f"{comm._PREFIX}/failed/1",
                                                       "raised at step 2 ValueError: injected failure")
        with pytest.raises(SystemExit, match="2"):
            watcher._run()
    finally:
        dist.destroy_process_group()
    assert capsys.readouterr().err.strip() == ("error: rank 1 raised at step 2 ValueError: injected failure "
                                               "and exited with status 1")
