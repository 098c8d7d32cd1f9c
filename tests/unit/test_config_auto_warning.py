"""HF-style "auto" values filled from flexspeed's defaults (no trainer supplied them) are named in one
warning with the values used; values that come from the run (the optimizer's lr for the scheduler, the
data loader's batch size) are not."""

from __future__ import annotations

import json
import warnings

from flexspeed.cli.main import main
from flexspeed.config.resolve import resolve_config
from flexspeed.utils.logging import reset_warn_once

HF = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
      "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
      "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                   "warmup_num_steps": 10}}}


def test_defaulted_auto_values_are_named_once() -> None:
    reset_warn_once()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = resolve_config(HF, world_size=2, dataloader_batch_size=4)
        resolve_config(HF, world_size=2, dataloader_batch_size=4)  # the same set again: no second warning
    msgs = [str(w.message) for w in caught if '"auto" values filled with defaults' in str(w.message)]
    assert len(msgs) == 1, msgs
    for part in ("bf16.enabled=false", "gradient_clipping=1.0", "optimizer.params.lr=0.001",
                 "optimizer.params.weight_decay=0.0", "scheduler.params.warmup_min_lr=0.0"):
        assert part in msgs[0], (part, msgs[0])
    assert "warmup_max_lr" not in msgs[0] and "train_micro_batch_size_per_gpu" not in msgs[0]
    assert cfg.scheduler.params["warmup_max_lr"] == 0.001


def test_no_warning_without_auto() -> None:
    reset_warn_once()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, world_size=2)
    assert not [w for w in caught if '"auto"' in str(w.message)]


def test_check_config_reports_it(tmp_path, capsys) -> None:
    reset_warn_once()
    path = tmp_path / "hf.json"
    path.write_text(json.dumps(HF))
    assert main(["check-config", str(path), "--world-size", "2", "--batch-size", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("optimizer.params.lr=0.001" in w for w in report["warnings"]), report["warnings"]
