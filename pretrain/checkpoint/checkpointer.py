"""`Checkpointer`: saves the tracked items of a run (the DeepSpeed engine, the value shards, the
train state, each rank's state, extra writers) as one checkpoint on every rank, agreeing on
failures in collectives; verifies a checkpoint before a resume; loads it, re-partitioned where the
number of ranks or the data layout changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checkpoint.compatibility import (
    check_compatible,
    check_dtype_change,
    check_value_optimizer_change,
    check_zero_stage_change,
    model_fingerprint,
)
from pretrain.checkpoint.layout import (
    TMP_PREFIX,
    CheckpointError,
    latest_checkpoint,
    prune_checkpoints,
    rank_file,
    tag_for,
)
from pretrain.checkpoint.verification import resume_refusal, verify
from pretrain.checksums import checksum_problem, write_checksums
from pretrain.config import ConfigError, RunConfig, save_config
from pretrain.data.sources import mixture_change
from pretrain.distributed import barrier, first_problem, refusal_shared
from pretrain.files import TEMP_MARK, atomic_write, discard, flush_to_disk, replace_with, temp_path_beside
from pretrain.lr_schedule import check_resumed_schedule
from pretrain.refused_writes import describe, is_write_failure
from pretrain.words import counted


def _attempt(fn, *args) -> Exception | None:
    """fn(*args); the exception it raised, or None."""
    try:
        fn(*args)
    except Exception as err:  # judged by Checkpointer._agree, on every rank
        return err
    return None


class _RecordingWrites:
    """DeepSpeed's checkpoint engine, whose `save` records the first failed write instead of
    raising it, so that DeepSpeed's save runs on to its closing barrier on this rank as on the
    others (raised out of it, the rank left them waiting there), and flushes each file it wrote to
    disk. The flush is the writing rank's: on a filesystem shared by nodes, rank 0's flush at the
    commit reaches what the server holds, not what another node's cache has yet to send."""

    def __init__(self, inner):
        self.inner, self.failure = inner, None

    def save(self, state_dict, path: str):
        if self.failure is None:
            try:
                self.inner.save(state_dict, path)
                flush_to_disk(path)
            except Exception as err:
                self.failure = err

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _save_deepspeed(engine, save_dir: str, tag: str, client_state: dict) -> Exception | None:
    """DeepSpeed's save of `engine` under `save_dir/tag`; the first failure, returned. Its collectives
    (a barrier, the tag's check) come before its writes, and one barrier after them; a write that
    fails outside its checkpoint engine (rank 0's copy of its recovery script) is met there by this
    rank's own barrier."""
    recording = _RecordingWrites(engine.checkpoint_engine)
    engine.checkpoint_engine = recording
    engine._copy_recovery_script = _RecoveryScripts(engine._copy_recovery_script)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except Exception as err:
        if not is_write_failure(err):
            raise
        barrier()  # DeepSpeed's closing one, where the other ranks wait
        return recording.failure or err
    finally:
        engine.checkpoint_engine = recording.inner
        del engine._copy_recovery_script  # the class's method again
    return recording.failure


class _RecoveryScripts:
    """DeepSpeed's copy of its recovery scripts (zero_to_fp32.py, ...) into the checkpoints folder,
    made atomic. At every ZeRO save rank 0 copied them over the previous copies in place, outside
    any step folder: a crash mid-copy left a truncated script there. DeepSpeed's own copy now fills
    a temporary folder beside them, and each script is moved into place whole."""

    def __init__(self, copy):
        self.copy = copy

    def __call__(self, save_path: str) -> None:
        save_path = Path(save_path)
        tmp = temp_path_beside(save_path / "recovery-scripts")  # a kill's leftover: removed at the next save
        tmp.mkdir()
        try:
            self.copy(str(tmp))
            for script in sorted(tmp.iterdir()):
                replace_with(script, save_path / script.name)
        finally:
            discard(tmp)


class Checkpointer:
    """Saves and restores complete training checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str | Path, rank: int, keep: int, world_size: int = 1):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep, self.world_size = rank, keep, world_size
        self.saved_step: int | None = None  # the step of this process's last complete save
        self.saved_world: int | None = None  # ranks that wrote the checkpoint `verify` passed
        self.schedule_change: str | None = None  # how that checkpoint's learning-rate schedule was changed
        self.mixture_change: str | None = None  # and its training data (data.sources)
        self.engine = self.memory_parallel = self.train_state = self.rank_state = None
        self.writers: list = []

    def track(self, engine, memory_parallel, train_state, rank_state, writers=()) -> None:
        """Declare what every checkpoint holds: the DeepSpeed engine, the value shards, the run's
        `train_state` (saved as DeepSpeed's client state), this rank's `rank_state` (one file per
        rank) and `writers`, objects whose `write(folder)` adds files of their own (a collective:
        every rank calls it, after DeepSpeed's save and this rank's own files; also after one of those failed)."""
        self.engine, self.memory_parallel = engine, memory_parallel
        self.train_state, self.rank_state, self.writers = train_state, rank_state, list(writers)

    def save(self, step: int, cfg: RunConfig) -> Path:
        """Write a checkpoint of the tracked items for `step` on every rank; return its final folder.

        A failure on any rank (a full disk, a refused write, an error in a writer) is raised on
        every rank, naming that rank and its cause, at the next of the save's four agreements
        (after preparing the folder, writing, summing, committing): a failing rank still takes
        part in the collectives of its stage, so that none is left waiting in one for a rank that
        has left. Nothing committed is touched before the last stage."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        self._agree(tag, tmp_dir, _attempt(self._prepare) if self.rank == 0 else None)
        self._agree(tag, tmp_dir, self._write(tmp_tag, tmp_dir, cfg))  # after it, every rank's files are whole
        self._agree(tag, tmp_dir, _attempt(write_checksums, tmp_dir, self.rank, self.world_size))
        committing = _attempt(self._commit, tmp_dir, final_dir, tag) if self.rank == 0 else None
        self._agree(tag, tmp_dir, committing, committed=final_dir)
        self.saved_step = step
        return final_dir

    def _prepare(self) -> None:
        self._remove_stale_temporaries()
        self.root.mkdir(parents=True, exist_ok=True)

    def _commit(self, tmp_dir: Path, final_dir: Path, tag: str) -> None:
        replace_with(tmp_dir, final_dir)
        atomic_write(self.root / "latest", tag)
        prune_checkpoints(self.root, self.keep, tag)

    def _write(self, tmp_tag: str, tmp_dir: Path, cfg: RunConfig) -> Exception | None:
        """Every tracked item of this rank into the unfinished checkpoint `tmp_dir`. The first
        failure is returned, not raised; the writing that holds collectives (DeepSpeed's save, the
        writers) runs on after it."""
        client_state = dict(self.train_state.state_dict(), model_config=model_fingerprint(cfg))
        failure = _save_deepspeed(self.engine, str(self.root), tmp_tag, client_state)
        if failure is None:
            failure = _attempt(self.memory_parallel.save, tmp_dir)
        if failure is None:
            failure = _attempt(_atomic_torch_save, self.rank_state.state_dict(), rank_file(tmp_dir, self.rank))
        if failure is None and self.rank == 0:
            failure = _attempt(save_config, cfg, tmp_dir / "config.yaml")
        for writer in self.writers:
            problem = _attempt(writer.write, tmp_dir)
            failure = failure if failure is not None else problem
        return failure

    def _agree(self, tag: str, tmp_dir: Path, failure: Exception | None, committed: Path | None = None) -> None:
        """Raise on every rank where a stage of the save of `tag` failed on any (a collective):
        this rank's own failure as it was where it is not a refused write (a fault of the code,
        with its traceback), otherwise a CheckpointError naming the failing rank, its cause, and
        the checkpoint that is kept. `committed`: the final folder, at the commit stage, where a
        failure may follow its rename (`latest` not written)."""
        mine = None
        if failure is not None:
            if is_write_failure(failure):
                refused = describe(failure, self.root, "give train.run_dir a filesystem with room", self._size())
                mine = f"{refused.reason}\n{refused.fix}, then run again\n{refused.detail}"
            else:
                mine = f"{type(failure).__name__}: {failure}\nSee that rank's traceback; fix it, then run again\n"
        agreed = first_problem(mine)
        if agreed is None:
            return
        if failure is not None and not is_write_failure(failure):
            raise failure
        cause, fix, detail = agreed.message.rsplit("\n", 2)
        if len(agreed.ranks) > 1:
            cause = f"rank {agreed.rank}: {cause}"
        renamed = committed is not None and committed.is_dir() and not tmp_dir.exists()
        if self.rank == 0 and not renamed:  # every rank has stopped writing into it (this was a collective)
            shutil.rmtree(tmp_dir, ignore_errors=True)  # on a full disk, the room it held; what is left: next save
        message = self._write_failure(tag, tmp_dir, agreed.who(), cause, fix, renamed)
        raise CheckpointError(f"{message}. {detail}" if detail else message) from failure

    def _size(self) -> int | None:
        """The bytes of the newest complete checkpoint, what the next one will need about; None
        where there is none."""
        try:
            previous = latest_checkpoint(self.root)
        except (CheckpointError, OSError):
            return None
        if previous is None:
            return None
        try:
            return sum(p.stat().st_size for p in previous.rglob("*") if p.is_file())
        except OSError:
            return None

    def _write_failure(self, tag: str, tmp_dir: Path, who: str, cause: str, fix: str, renamed: bool = False) -> str:
        try:
            previous = latest_checkpoint(self.root)
        except CheckpointError:
            previous = None
        latest = self.root / "latest"
        if renamed:  # the folder is whole; `latest` (or the pruning after it) failed
            done = f"{who} could not write checkpoint {tag} ({cause}) after its folder was complete: {self.root / tag}"
            if previous is None:  # a resume refuses checkpoint folders without `latest`
                return (
                    f"{done} holds the whole checkpoint, but {latest} was not written. {fix}, and write '{tag}' "
                    f"into {latest}: the run resumes from it (it refuses to start while {latest} is missing)"
                )
            if previous.name == tag:
                return f"{done} is complete and {latest} names it. {fix}: the run resumes from {tag}"
            return (
                f"{done} holds the whole checkpoint, but {latest} still names {previous.name}. {fix}: the run "
                f"resumes from {previous.name}; to resume from {tag} instead, write '{tag}' into {latest}"
            )
        kept = (
            f"{self.root / 'latest'} still names {previous.name}, which is complete"
            if previous is not None
            else "there is no earlier checkpoint"
        )
        return (
            f"{who} could not write checkpoint {tag} in {self.root} ({cause}); nothing else was changed: {kept}, and "
            f"the unfinished {tmp_dir.name} is deleted. {fix}: the run resumes from "
            f"{previous.name if previous else 'the start'}"
        )

    def verify(self, ckpt_dir: Path, cfg: RunConfig, dataset_dir: Path | None = None):
        """Refuse a checkpoint that a resume on this world size could not read whole
        (CheckpointError naming the file and the newest complete checkpoint) or whose model
        config differs (ConfigError). Records the world size that saved it; loads nothing.
        Returns what `export.source.inspect` read of it (its step, tokens seen, ...).

        Each rank reads its own files: a refusal on one rank (its file of the checkpoint damaged)
        is raised on every rank, naming it (a collective)."""
        with refusal_shared(CheckpointError):
            try:
                saved = verify(ckpt_dir, self.world_size, dataset_dir, self.rank)
            except CheckpointError as err:
                raise CheckpointError(
                    resume_refusal(ckpt_dir, str(err), self.world_size, dataset_dir, self.rank)
                ) from None
        problem = checksum_problem(ckpt_dir, self.rank, self.world_size)  # a collective: each rank reads a share
        if problem is not None:
            raise CheckpointError(resume_refusal(ckpt_dir, problem, self.world_size, dataset_dir, self.rank))
        with refusal_shared(CheckpointError, ConfigError):
            self.saved_world = saved.dp_world_size
            check_zero_stage_change(saved.cfg.train.zero_stage, cfg.train.zero_stage, ckpt_dir)
            check_dtype_change(saved.cfg.train.dtype, cfg.train.dtype, ckpt_dir)
            check_value_optimizer_change(saved.cfg.optim.value_optimizer, cfg.optim.value_optimizer, ckpt_dir)
            saved_config = ckpt_dir / "config.yaml"
            check_compatible(OmegaConf.to_container(OmegaConf.load(saved_config))["model"], cfg, ckpt_dir)
            self.schedule_change = check_resumed_schedule(saved.cfg, cfg, saved.step, ckpt_dir.name)
            change = mixture_change(saved.cfg.data, cfg.data)
            self.mixture_change = f"data.sources changed from step {saved.step}: {change}" if change else None
        return saved

    def reshards(self) -> bool:
        """True if the checkpoint `verify` passed last was saved by another number of ranks than this run's."""
        return self.saved_world is not None and self.saved_world != self.world_size

    def needs_universal_load(self, ckpt_dir: Path | None) -> bool:
        """True if resuming `ckpt_dir` needs DeepSpeed's universal checkpoint (`checkpoint.load_universal`)."""
        from pretrain.resharding import dense_state_is_partitioned

        return ckpt_dir is not None and self.reshards() and dense_state_is_partitioned(ckpt_dir)

    def load(self, ckpt_dir: Path) -> str | None:
        """Restore every tracked item from `ckpt_dir`; on another world size (or data layout:
        workers, micro-batch, shuffle buffer), re-partition them and return a line saying what changed.

        Call `verify` first. Every file is read with the weights-only unpickler, DeepSpeed's too."""
        from pretrain.export.dense import weights_only_loads

        def read(rank: int) -> dict:  # memory-mapped: a reshard reads only the tensors it uses
            return torch.load(rank_file(ckpt_dir, rank), map_location="cpu", weights_only=True, mmap=True)

        # all old ranks' states when the world size changed, or the data layout did (workers, micro-batch)
        own = None if self.reshards() else read(self.rank)
        reshard = own is None or self.rank_state.needs_reshard(own)
        rank_states = [read(r) for r in range(self.saved_world)] if reshard else [own]
        dense_dir = self._universal_form(ckpt_dir) if self.needs_universal_load(ckpt_dir) else ckpt_dir
        group_settings = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        with weights_only_loads():  # DeepSpeed's own torch.load passes weights_only=False
            _, client_state = self.engine.load_checkpoint(
                str(dense_dir.parent), tag=dense_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {dense_dir} (missing files?)")
        if dense_dir != ckpt_dir:
            self._repair_universal_load(group_settings)
        self.memory_parallel.load(ckpt_dir)
        self.train_state.load_state_dict(client_state)
        if not reshard:
            self.rank_state.load_state_dict(rank_states[0])
            return None
        merged = self.rank_state.load_resharded(rank_states)
        if not self.reshards():
            return f"the data layout changed (data.num_workers, train.micro_batch or data.shuffle_buffer), re-planned: {merged}"
        dense = "DeepSpeed universal checkpoint" if dense_dir != ckpt_dir else "whole in the model states"
        return (
            f"re-partitioned from {counted(self.saved_world, 'rank')} to {self.world_size}: dense state {dense}; "
            f"value shards re-split; {merged}"
        )

    def _repair_universal_load(self, group_settings: list[dict]) -> None:
        """Undo two faults of DeepSpeed's ZeRO-3 universal load (deepspeed 0.19,
        `load_hp_checkpoint_state_from_checkpoint_dir_stage3`), found by tests/train/test_world_change.py:
        it gives every parameter group the first group's settings (weight decay on the norms and
        keys; ours come from the config, so they are put back), and it stores one `step` tensor in
        every sub-group's state, which the fused AdamW then increments once per sub-group."""
        for group, settings in zip(self.engine.optimizer.param_groups, group_settings):
            group.update(settings)
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal_form(self, ckpt_dir: Path) -> Path:
        """Rank 0 converts, every rank waits; a failed conversion is raised on every rank."""
        from pretrain.resharding import convert_to_universal, universal_dir

        with refusal_shared(CheckpointError):
            if self.rank == 0:
                convert_to_universal(ckpt_dir, self.saved_world)
        return universal_dir(ckpt_dir)

    def unfinished(self) -> list[Path]:
        """Checkpoints whose writing was cut off (`.tmp-step_*`: a run killed or out of disk while
        saving), which a resume ignores; removed at the next save."""
        return sorted(p for p in self.root.glob(TMP_PREFIX + "step_*") if p.is_dir()) if self.root.is_dir() else []

    def _remove_stale_temporaries(self) -> None:
        """Unfinished checkpoints and universal conversions, and the temporaries of atomic writes
        a killed process left (`.<name>.tmp-<pid>@<host>-…`, pretrain.files)."""
        if self.root.is_dir():
            for stale in [*self.root.glob(TMP_PREFIX + "*"), *self.root.glob(f".*{TEMP_MARK}*")]:
                discard(stale)


def _torch_save_to(obj, path: Path) -> None:
    # through a Python file object: torch's own file writer (given a path) drops the errno of a
    # refused write, which is then the context of its RuntimeError
    with open(path, "wb") as file:
        torch.save(obj, file)


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: _torch_save_to(obj, tmp))
