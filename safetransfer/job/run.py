"""One job: a config, its seeds run one after another (or at once, runtime.concurrent_seeds),
one row in the results table. `run_job` is what the Hydra entrypoint calls; `run_seed`
trains one seed (built by safetransfer.job.build) and evaluates it.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from safetransfer.common.atomic import atomic_torch_save, atomic_write_json, read_json
from safetransfer.common.devices import job_device, resolve_device
from safetransfer.common.downloads import network
from safetransfer.common.fingerprints import config_key
from safetransfer.common.processes import run_each
from safetransfer.common.registry import build
from safetransfer.common.signals import Preempted, StopSignals, at_once
from safetransfer.data.preparation import Data, check_classes, prepare_data, save_indices, seed_data
from safetransfer.data.targets.base import Target
from safetransfer.job.build import build_seed, train_log
from safetransfer.job.checks import check_config
from safetransfer.reporting import tables
from safetransfer.reporting.methods import method_name, method_structure, source_label
from safetransfer.reporting.search import apply_chosen
from safetransfer.reporting.store import record
from safetransfer.sources.base import SourceWeights, own_keys, provenance
from safetransfer.sources.local import check_save_to, export_source
from safetransfer.training.checkpoints import CHECKPOINT, Checkpointer
from safetransfer.training.engine import NonFiniteError, evaluate, fit, save_spectrum
from safetransfer.training.train_log import duration_text, shared_cpu_note

log = logging.getLogger(__name__)

FAILED = "failed.json"  # in a seed's directory: it stopped on a NaN or inf, and why


#: a projected job longer than this gets the ways to shorten it
LONG_JOB_S = 30 * 60


def pace_report(cfg: DictConfig, seeds_after: int):
    """engine.Loop.on_pace for a job's first seed: the projected time of the seed and of the
    job, and, when long, how to shorten it."""

    def report(seconds_per_iteration: float, left: int) -> None:
        seed_s = seconds_per_iteration * cfg.train.iterations
        job_s = seconds_per_iteration * left + seed_s * seeds_after
        device = resolve_device(str(cfg.runtime.device))
        log.info(
            "pace: %.3g s per iteration on %s: a seed takes about %s (%d iterations); this job about %s more "
            "(%d seed%s to go), measured again at each log row%s",
            seconds_per_iteration,
            device,
            duration_text(seed_s),
            cfg.train.iterations,
            duration_text(job_s),
            seeds_after + 1,
            "s" if seeds_after else "",
            shared_cpu_note(device),
        )
        if job_s > LONG_JOB_S:
            fits = max(1, int(LONG_JOB_S / 4 / seconds_per_iteration / (seeds_after + 1)))
            smaller = ", smaller images (data.resize=128 data.crop=112)" if cfg.data.crop > 112 else ""
            log.warning(
                "this job will take about %s. To shorten it: train.iterations=%d (the lr drop moves with it "
                "when optim.scheduler.milestones is a fraction of the run, as by default), fewer seeds "
                "(seeds=[0])%s, or a GPU (runtime.device=cuda)",
                duration_text(job_s),
                fits,
                smaller,
            )

    return report


def run_seed(
    cfg: DictConfig,
    seed: int,
    data: Data,
    source: SourceWeights | None,
    run_dir: Path,
    stop: StopSignals | None = None,
    on_pace=None,
    origin: dict | None = None,
) -> dict | None:
    """Fine-tune once and evaluate the final weights (never the best test epoch). Continues
    from the seed's checkpoint when an earlier run left one. A NaN or inf stops the seed:
    it is recorded in failed.json and None returned. A stop request (`stop`, a signal)
    checkpoints and raises common.signals.Preempted."""
    seed_dir = run_dir / f"seed_{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    # an atomic write cut short (SIGKILL mid-checkpoint): this job holds the run directory (job.lock),
    # so no live writer's
    for stale in seed_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", stale)
    built = build_seed(cfg, seed, data, source, on_pace)
    model, device, precision = built.parts.model, built.parts.device, cfg.train.precision
    key = config_key(cfg)
    checkpointer = Checkpointer(seed_dir / CHECKPOINT, key, cfg.runtime.checkpoint_every)
    start = time.perf_counter()
    try:
        fit(
            built.parts,
            built.loop,
            train_log(cfg, built, seed_dir, f"seed {seed}"),
            checkpointer,
            built.evaluator,
            stop,
        )
    except NonFiniteError as error:
        atomic_write_json(seed_dir / FAILED, {"seed": seed, "key": key, "error": str(error)})
        log.error("%s: the seed is recorded as failed (%s) and left out of the table", error, seed_dir / FAILED)
        return None
    top1, test_loss = evaluate(model, built.test_loader, device, precision, built.test_batches)
    save_spectrum(
        seed_dir / "spectrum.json", model, built.test_loader, device, cfg.runtime.spectrum_batches, built.test_batches
    )
    validation = {}
    if built.val_loader is not None:
        val_top1, val_loss = evaluate(model, built.val_loader, device, precision)
        validation = {"val_top1": val_top1, "val_loss": val_loss, "val_images": len(data.val)}
    metrics = {
        "seed": seed,
        "method": method_name(cfg),
        "structure": method_structure(cfg),  # what the method is: its table name and reference come from it
        "top1": top1,
        "test_loss": test_loss,
        "iterations": cfg.train.iterations,
        "wall_time_s": time.perf_counter() - start,
        "device": str(device),
        "precision": precision if device.type == "cuda" else "fp32",
        "train_images": len(data.train),
        "test_images": len(data.test),
        **validation,
        "source_checkpoint": origin,  # sources.provenance: the file the weights came from and its sha256
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if cfg.runtime.get("save_weights"):  # before metrics.json: a finished seed has its weights
        atomic_torch_save(
            {
                "backbone": cfg.backbone.name,
                "num_classes": data.num_classes,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            },
            seed_dir / "model.pt",
        )
    atomic_write_json(seed_dir / "metrics.json", metrics)
    if not cfg.runtime.keep_checkpoints:
        checkpointer.remove()
    if cfg.pretrain.save_to and seed == cfg.seeds[0]:
        export_source(cfg, model, seed, top1, test_loss, run_dir)
    log.info("seed %d: top-1 %.2f%%, test loss %.4f (%.0f s)", seed, top1, test_loss, metrics["wall_time_s"])
    return metrics


def finished_seed(run_dir: Path, seed: int, key: str, origin: dict | None = None) -> dict | None:
    """The metrics of `seed` if an earlier run of this same config, from the same source
    checkpoint (`origin`'s sha256), finished it in `run_dir`."""
    path = run_dir / f"seed_{seed}" / "metrics.json"
    if not path.exists():
        return None
    metrics = read_json(path, needs=("config", "top1"))
    if metrics is None:  # a damaged file (read_json said which): the seed is trained again
        return None
    if config_key(OmegaConf.create(metrics["config"])) != key:
        log.warning("%s holds seed %d of another config; it is run again and replaced", path.parent, seed)
        return None
    before = (metrics.get("source_checkpoint") or {}).get("sha256")
    if origin is not None and before and before != origin.get("sha256"):
        log.warning(
            "%s: seed %d was fine-tuned from another version of %s (sha256 %s, now %s); it is run again",
            path.parent,
            seed,
            origin.get("file"),
            before[:12],
            str(origin.get("sha256"))[:12],
        )
        return None
    return metrics


def failed_seed(run_dir: Path, seed: int, key: str) -> str | None:
    """Why `seed` failed, if an earlier run of this same config recorded it failed in `run_dir`."""
    path = run_dir / f"seed_{seed}" / FAILED
    if not path.exists():
        return None
    record = read_json(path, needs=("key", "error"))  # damaged: the seed is tried again
    return record["error"] if record is not None and record["key"] == key else None


def resolved(cfg: DictConfig) -> tuple[DictConfig, str]:
    """The job's own config, made once before it runs and validated once: without the source keys its
    source does not take (given to a sweep over sources), with its cell's values chosen by stage 1 of a
    table's search (search.chosen); and those chosen values as text, for the table."""
    cfg = copy.deepcopy(cfg)
    foreign = own_keys(cfg.source)
    if foreign:
        log.info(
            "source=%s leaves out the keys it does not take (given for the other sources of the sweep, or "
            "by the source the method replaces): %s",
            cfg.source.name,
            ", ".join(f"source.{k}" for k in foreign),
        )
    strays = [
        name for name, node in cfg.regularizer.terms.items() if isinstance(node, DictConfig) and "kind" not in node
    ]
    with open_dict(cfg.regularizer.terms):
        for name in strays:  # `++regularizer.terms.<term>.x=...` in a sweep over methods, some without that term
            del cfg.regularizer.terms[name]
    if strays:
        log.info(
            "the regularizer %s has no term %s: the keys given for it (for other methods of the sweep) are left out",
            cfg.regularizer.name,
            ", ".join(strays),
        )
    chosen = apply_chosen(cfg, method_name(cfg))
    if chosen:
        log.info("the values stage 1 chose for this cell: %s", chosen)
    check_config(cfg)
    return cfg, chosen


def run_job(cfg: DictConfig, run_dir: Path, stop: StopSignals | None = None) -> dict:
    """Check the config, run every seed not finished yet, add them to the table; returns the job's
    numbers. `stop` (safetransfer.common.signals.StopSignals) asks the running seed to checkpoint and stop.
    The caller holds `run_dir` (safetransfer/job/lock.py: the entry point does, for the job's lifetime)."""
    cfg, chosen = resolved(cfg)
    check_save_to(cfg, run_dir)
    with job_device(cfg), network(cfg.paths):
        return _run_job(cfg, run_dir, chosen, stop)


def seed_threads(cfg: DictConfig) -> int:
    """CPU threads of each seed's process under runtime.concurrent_seeds: the job's threads shared
    out over all of its seeds, not only over those left, so that a rerun with fewer seeds left
    gives each the threads it had before (the same float rounding: an exact resume)."""
    return max(1, torch.get_num_threads() // len(cfg.seeds))


def run_seeds_concurrently(
    cfg: DictConfig, seeds: list[int], run_dir: Path, stop: StopSignals | None = None
) -> dict[int, dict | None]:
    """runtime.concurrent_seeds: each seed in a process of its own, all at once (on one GPU,
    they share it); a single seed left too, so that it runs as it ran before. Each process loads
    the source and the cached data itself; stop requests reach them through this process, and
    they stop when it dies (safetransfer.common.processes). A seed stopped by a signal raises
    Preempted here once all have ended; an error in one is raised once all have ended."""
    container = OmegaConf.to_container(cfg, resolve=True)
    threads = seed_threads(cfg)
    log.info("seeds %s run concurrently, a process each; CPU threads per process: %d", seeds, threads)
    outcomes = run_each(_seed_process, {seed: (container, seed, str(run_dir), threads) for seed in seeds}, stop)
    results, stopped, errors, kept = {}, [], [], []
    for seed, outcome in outcomes.items():
        if isinstance(outcome.error, Preempted):
            stopped.append(outcome.error)
            kept.append(f"seed {seed} after iteration {outcome.error.iteration}, {outcome.error.where()}")
        elif outcome.error is not None:
            errors.append(outcome.error)
        elif outcome.exitcode is not None:
            how = f"signal {-outcome.exitcode}" if outcome.exitcode < 0 else f"exit code {outcome.exitcode}"
            problem = f"seed {seed}'s process ended ({how}) before it reported"
            if stop is not None and stop.requested is not None:
                stopped.append(Preempted(stop.requested, 0, None))
                kept.append(f"{problem}, its last checkpoint (if any) kept")
            else:
                errors.append(RuntimeError(f"{problem}; rerun the same command to continue from its last checkpoint"))
        else:
            results[seed] = outcome.value
            kept.append(f"seed {seed} finished")
    if errors:
        raise errors[0]
    if len(stopped) == 1 and len(kept) == 1:
        raise stopped[0]
    if stopped:  # what each seed kept, in one line
        raise Preempted(stopped[0].signum, min(p.iteration for p in stopped), None, kept="; ".join(kept))
    return results


def _seed_process(container: dict, seed: int, run_dir: str, threads: int) -> dict | None:
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][seed {seed}][%(name)s][%(levelname)s] - %(message)s")
    torch.set_num_threads(threads)
    with StopSignals() as stop:  # first, so that a stop request during the loading is not lost
        cfg = OmegaConf.create(container)
        target: Target = build("target", cfg.target, "target")
        with network(cfg.paths):
            source = build("source", cfg.source, "source")
            weights = source.load(cfg.backbone.name)
        data = seed_data(cfg, target, seed, Path(run_dir), None)
        return run_seed(cfg, seed, data, weights, Path(run_dir), stop, origin=provenance(source, cfg.backbone.name))


def _run_job(cfg: DictConfig, run_dir: Path, chosen: str, stop: StopSignals | None) -> dict:
    target: Target = build("target", cfg.target, "target")
    with at_once(f"checking target={target.name} (and downloading it, with target.download=true)"):
        target.check()
    check_classes(cfg.target.name, len(target.classes))
    method = method_name(cfg)
    # the source before the data: a missing checkpoint is reported before any cache is built
    source = build("source", cfg.source, "source")
    weights = source.load(cfg.backbone.name)
    origin = provenance(source, cfg.backbone.name)
    data = prepare_data(cfg, target)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_indices(run_dir / "sampled_train_indices.json", cfg, data)
    log.info(
        "%s | %s -> %s at %g%% (%d training images) | %d seeds",
        method,
        source_label(cfg.source),
        cfg.target.name,
        cfg.target.sampling_rate,
        len(data.train),
        len(cfg.seeds),
    )

    every, iterations = cfg.runtime.log_every, cfg.train.iterations
    if every and iterations // every < 2:  # the last iteration's row only: no curve to draw
        log.warning(
            "runtime.log_every=%d over %d iterations logs one row a seed: safetransfer-plot needs two or more "
            "for its loss curves (e.g. runtime.log_every=%d)",
            every,
            iterations,
            max(1, iterations // 10),
        )
    key = config_key(cfg)
    outcomes: dict[int, dict | None] = {}
    for seed in cfg.seeds:
        done, error = finished_seed(run_dir, seed, key, origin), failed_seed(run_dir, seed, key)
        if done is not None:
            log.info("seed %d: finished earlier in %s (top-1 %.2f%%), kept", seed, run_dir, done["top1"])
            outcomes[seed] = done
        elif error is not None:
            log.warning(
                "seed %d failed earlier and is skipped (delete %s to try again): %s",
                seed,
                run_dir / f"seed_{seed}" / FAILED,
                error,
            )
            outcomes[seed] = None
    pending = [seed for seed in cfg.seeds if seed not in outcomes]
    if cfg.runtime.concurrent_seeds and pending:
        outcomes.update(run_seeds_concurrently(cfg, pending, run_dir, stop))
    for number, seed in enumerate(pending):
        if seed in outcomes:
            continue
        if stop is not None and stop.requested is not None:  # asked to stop while the seed before ended
            raise Preempted(stop.requested, 0, None, during=f"starting seed {seed}")
        pace = pace_report(cfg, len(pending) - 1) if number == 0 else None
        outcomes[seed] = run_seed(
            cfg, seed, seed_data(cfg, target, seed, run_dir, data), weights, run_dir, stop, pace, origin
        )
    finished = [seed for seed in cfg.seeds if outcomes[seed] is not None]
    failed = [seed for seed in cfg.seeds if outcomes[seed] is None]
    accuracies = [outcomes[seed]["top1"] for seed in finished]
    if not finished:
        first = failed_seed(run_dir, failed[0], key) or "see its failed.json"
        raise NonFiniteError(
            f"every seed failed, nothing is written to the table; {first} ({run_dir}/seed_*/{FAILED} says why for each)"
        )
    records = [
        record(outcomes[seed], run_dir, chosen, local_paths=bool(cfg.results.get("local_paths", False)))
        for seed in finished
    ]
    tables.write(Path(cfg.results.dir), str(cfg.results.table), records)
    mean, std = tables.summarize(accuracies)
    validation = [outcomes[seed].get("val_top1") for seed in finished]
    log.info(
        "%s: %s over %d seed%s -> %s",
        method,
        tables.format_cell(mean, std),
        len(finished),
        "s" if len(finished) > 1 else "",
        tables.view_path(Path(cfg.results.dir), str(cfg.results.table)),
    )
    return {
        "mean": mean,
        "std": std,
        "n_seeds": len(finished),
        "seeds": finished,
        "failed": failed,
        "key": key,
        "table": str(cfg.results.table),
        # what a sweeper optimises (commands/train.py): the validation split's, never the test split's
        "val_mean": statistics.fmean(validation) if None not in validation else None,
    }


__all__ = ["run_job", "run_seed"]
