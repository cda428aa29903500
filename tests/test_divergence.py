"""A diverged run stops: with optim.lr=1e6 the training loss turns NaN, and every Lightning path
(single worker, sync SGD, PowerSGD over two processes) ends with one line naming the step and the
fix, exit status 2 and no results.json (single and powersgd used to exit 0 with WER 1.0 results)."""
from __future__ import annotations

import pytest

from tests.test_pipeline import asrbench, corpus  # noqa: F401  (corpus is a fixture)

pytestmark = pytest.mark.slow  # trains through the command line

RUN = ("data=synth_tiny", "model=lstm_tiny", "batch_size=2", "eval_batch_size=16", "optim.lr=1e6", "logger=none",
       "trainer.max_epochs=10", "trainer.enable_progress_bar=false", "accelerator=cpu")


@pytest.mark.parametrize("strategy, nodes", [("single", 1), ("sync", 2), ("powersgd", 2)])
def test_a_diverged_loss_stops_the_run_with_one_line_and_no_results(corpus, tmp_path, strategy, nodes):  # noqa: F811
    run = tmp_path / strategy
    proc = asrbench("train", *RUN, f"data.root={corpus}", f"strategy={strategy}", f"nodes={nodes}",
                    f"hydra.run.dir={run}", check=False, timeout=240)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "training loss is NaN or inf at step" in lines[0] and "lower optim.lr (this run: 1e+06)" in lines[0]
    assert not (run / "results.json").exists()
