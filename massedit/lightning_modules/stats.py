"""Lightning glue for second-moment statistics (the math is ``massedit.stats.moments``).

``SecondMomentModule`` is run by ``Trainer.predict`` over ``massedit.datamodules.corpus.CorpusDataModule``.
Each rank accumulates ``Σ k kᵀ`` and the token count of its own shard of batches (one forward pass per
batch, stopping after the highest requested layer), checkpoints its partial sums atomically every
``job.checkpoint_every`` batches / ``job.checkpoint_seconds`` seconds (and resumes from them), and at
the end of the epoch the sums are all-reduced (SUM) across ranks; rank 0 writes them to ``job.result_paths``.
"""
from __future__ import annotations

import logging
import os

import pytorch_lightning as pl
import torch

from massedit.stats.moments import CheckpointPolicy, MomentState, Progress, accumulate_batch
from massedit.trainer import KeepDispatched

log = logging.getLogger("massedit.stats")


class SecondMomentModule(KeepDispatched, pl.LightningModule):
    def __init__(self, model: torch.nn.Module, job):
        super().__init__()
        self.model = model
        self.job = job
        self.state: MomentState | None = None
        self.resume_batches = 0
        self._progress: Progress | None = None
        self._hook = None

    # ------------------------------------------------------------------ setup / resume
    def _rank_world(self) -> tuple[int, int]:
        t = self._trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def setup(self, stage: str) -> None:
        rank, world = self._rank_world()
        if world > 1 and next(self.model.parameters()).device.type == "cpu":
            # CPU ranks share the machine's cores: avoid oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
        self.state = self.job.load_partial(rank, world)
        self.resume_batches = self.state.batches_done if self.state is not None else 0

    def on_predict_start(self) -> None:
        from massedit.core.adapters import get_adapter

        device = next(self.model.parameters()).device
        if self.state is None:
            m = get_adapter(self.model).mlp_inner_size
            self.state = MomentState.zeros(self.job.modules, m, self.job.torch_acc_dtype, device, self.job.blocks)
        else:
            self.state.sums = {k: v.to(device) for k, v in self.state.sums.items()}
        rank, world = self._rank_world()
        tb = self.job.token_batches
        counts = tb.batch_token_counts()
        shard_tokens = sum(counts[j] for j in tb.shard(rank, world))
        self._progress = Progress(shard_tokens, enabled=self.job.progress and rank == 0, initial=self.state.count,
                                  desc=f"C = E[kkᵀ] (rank {rank}/{world})" if world > 1 else "C = E[kkᵀ]")
        self._hook = self.job.interrupt_hook()
        self._policy = CheckpointPolicy(self.job.checkpoint_every, self.job.checkpoint_seconds)

    # ------------------------------------------------------------------ loop
    def forward(self, batch):
        return accumulate_batch(self.model, batch, self.job.modules, self.state.sums, self.state.blocks)

    def predict_step(self, batch, batch_idx):
        if "skip" in batch:  # padding step of a rank with fewer batches than the others
            return torch.tensor(0)
        n = self(batch)
        self.state.count += n
        self.state.batches_done += 1
        self._progress.update(n)
        if self._policy.due(self.state.batches_done):
            rank, world = self._rank_world()
            self.job.save_partial(self.state, rank, world)
            self._policy.mark()
        if self._hook is not None:
            self._hook(self.state)
        return torch.tensor(n)

    # ------------------------------------------------------------------ reduce + write
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="sum")

    def on_predict_epoch_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
        device = next(self.model.parameters()).device
        count = torch.tensor([float(self.state.count)], dtype=torch.float64, device=device)
        count = int(round(float(self._reduce_sum(count).item())))
        sums = {k: self._reduce_sum(v) for k, v in self.state.sums.items()}
        rank, world = self._rank_world()
        per_rank = torch.zeros(world, dtype=torch.float64, device=device)
        per_rank[rank] = self.state.batches_done
        per_rank = [int(x) for x in self._reduce_sum(per_rank).tolist()]
        reduced = MomentState(sums, count, self.state.batches_done, dict(self.state.extra))
        if rank == 0:
            self.job.write_results(reduced, world_size=world, batches_per_rank=per_rank)
        self.state = reduced
        if self._trainer is not None:
            self._trainer.strategy.barrier("massedit_stats_written")


class LightningStatsEngine:
    """Collects a :class:`~massedit.stats.collect.CollectionJob` with a Lightning Trainer's ``predict`` (the job's
    own Trainer: same devices and ranks as everything else); each rank accumulates its round-robin shard."""

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def world_size(self) -> int:
        return int(self.trainer.world_size)

    def __call__(self, model: torch.nn.Module, job) -> MomentState | None:
        """Collect; returns the summed (all-reduced) state, the same on every rank (``None`` with spawned workers)."""
        from massedit.datamodules.corpus import CorpusDataModule
        from massedit.trainer import keep_device, quiet_lightning

        module = SecondMomentModule(model, job)
        with quiet_lightning(), keep_device(model):
            self.trainer.predict(module, datamodule=CorpusDataModule(job.token_batches), return_predictions=False)
        return module.state if module.state is not None and module.state.count else None
