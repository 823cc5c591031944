"""The slot-frequency table as a checkpoint item: every checkpoint folder gets the reduced
table of the counters so far (`TABLE_FILENAME`), stamped with the run's identity."""

from __future__ import annotations

from pathlib import Path

from pretrain.slots.table import TABLE_FILENAME, model_config_hash, save_table


class SlotTableWriter:
    """`write(folder)` reduces the counters over ranks (a collective: every rank calls it) and
    rank 0 writes the table into `folder`."""

    def __init__(self, stats, model_cfg, tokenizer_sha256: str, train_state, is_main: bool):
        self.stats, self.model_cfg, self.tokenizer_sha256 = stats, model_cfg, tokenizer_sha256
        self.train_state, self.is_main = train_state, is_main

    def write(self, folder: Path) -> None:
        reduced = self.stats.reduce(close_interval=False)
        if self.is_main:
            save_table(
                folder / TABLE_FILENAME,
                reduced,
                {
                    "model_config_hash": model_config_hash(self.model_cfg),
                    "tokenizer_hash": self.tokenizer_sha256,
                    "run_id": self.train_state.run_id,
                },
            )
