"""The online IRL loop on Ray (docs/architecture.md). The driver dispatches to its actors, holds the loop
state and writes checkpoints; it holds no model, and every loss and estimator comes from ``dense_irl.algo``.

    SFT warm start (a policy learner) -> reward model initialised from the SFT policy
    per iteration (Driver.iteration, in named phases):
      rollout     sample G completions per prompt (rollout workers)
      reward      m reward steps: experts vs policy samples and perturbed experts (reward learners)
      score       the samples' dense step rewards (reward learner rank 0)
      advantages  step rewards (+ the verifier's outcome) -> per-step advantages (algo.advantages)
      policy      n PPO-clip + KL + ptx steps (policy learners)
      sync        the new weights to the rollout workers and to the reward learners' pi_old
    checkpoints (atomic) every k iterations; `resume: auto` continues with the same next batch.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import ray
from tqdm import tqdm

from dense_irl.algo.advantages import compute_advantages
from dense_irl.algo.batches import Experience
from dense_irl.algo.experience import next_prompts, online_reward_batch, split_demos
from dense_irl.config import save_config
from dense_irl.data.answers import is_correct
from dense_irl.data.demos import load_data
from dense_irl.data.layout import ChainLayout
from dense_irl.data.perturb import make_processbench
from dense_irl.errors import MissingFileError
from dense_irl.eval.localisation import calibrate_threshold, first_error, processbench_metrics
from dense_irl.io import MetricsLog
from dense_irl.runtime.checkpoints import latest_checkpoint, read_state, write_checkpoint
from dense_irl.runtime.learners import PolicyLearner, RankSpec, RewardLearner
from dense_irl.runtime.loop_config import LoopConfig
from dense_irl.runtime.placement import actor_options, place_roles, rendezvous
from dense_irl.runtime.rollout import RolloutWorker
from dense_irl.runtime.stopping import GracefulStop, actor_died
from dense_irl.runtime.timing import collect_compute
from dense_irl.runtime.warm_start import warm_start
from dense_irl.sampling.engines import RolloutConfig


class Driver:
    """Holds the actor handles and the loop state; every model lives in an actor."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.layout = ChainLayout(cfg.data.separator, cfg.model.max_length)
        self.calib, self.train = split_demos(load_data(cfg.data), cfg.data.calibration_chains, cfg.seed)
        self.eval_demos = self.calib[: cfg.eval_prompts]
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out)
        # reference: the KL reference policy's folder (the SFT policy), kept across resumes.
        self.state = {"iteration": 0, "cursor": {"epoch": 0, "pos": 0}, "rng": None, "reference": None}
        self.weight_spec = None  # set once the collective weight-sync group is built
        self.pg, self.bundle_of = None, {}  # the roles' placement group (runtime.placement)
        self.rng = random.Random(cfg.seed + 1)

    # ---------------------------------------------------------------- actors
    def _opts(self, role: str, i: int, num_cpus: float, num_gpus: float) -> dict:
        return actor_options(self.pg, self.bundle_of.get((role, i)), num_cpus, num_gpus)

    def _master(self, role: str) -> str:
        return rendezvous(self.pg, self.bundle_of.get((role, 0)))

    def _lead(self, actors: list, method: str, *args):
        """Rank 0's answer. Under ZeRO-3 every rank must join the parameter gathers, so all ranks are called."""
        zero3 = self.cfg.learner.backend == "deepspeed" and self.cfg.learner.zero_stage == 3
        return ray.get([getattr(a, method).remote(*args) for a in (actors if zero3 else actors[:1])])[0]

    def start_actors(self, policy_path: str, reward_path: str, reference_path: str) -> None:
        c = self.cfg
        self.pg, self.bundle_of = place_roles(c)
        n = c.learner.num_workers
        cpu, gpu = c.learner.num_cpus_per_worker, c.learner.num_gpus_per_worker
        master = self._master("policy")
        self.policy = [PolicyLearner.options(**self._opts("policy", r, cpu, gpu)).remote(
            policy_path, learner=c.learner, layout=self.layout, opt=c.rl, total_steps=c.iterations * c.rl.ppo_steps,
            model=c.model, group=RankSpec(r, n, master), reference_path=reference_path) for r in range(n)]
        master = self._master("reward")
        self.reward = [RewardLearner.options(**self._opts("reward", r, cpu, gpu)).remote(
            reward_path, policy_path, reward=c.reward, learner=c.learner, total_steps=c.iterations * c.reward_steps,
            model=c.model, group=RankSpec(r, n, master)) for r in range(n)]
        self.policy_path = policy_path
        self.workers = [self._new_worker(i) for i in range(c.rollout.num_workers)]

    def _new_worker(self, i: int):
        c = self.cfg.rollout
        return RolloutWorker.options(**self._opts("rollout", i, c.num_cpus_per_worker, c.num_gpus_per_worker)).remote(
            self.policy_path, cfg=c, seed=self._sample_seed(i))

    def _sample_seed(self, i: int) -> int:
        """Worker i's sampling seed at this iteration: a resumed run or a replaced worker redraws the same samples."""
        return self.cfg.seed * 1000 + i + 7919 * self.state["iteration"]

    def _on_all(self, actors, method: str, shards: list, **kwargs) -> list:
        """Call ``method`` on every rank with its shard (data parallel) and wait."""
        return ray.get([getattr(a, method).remote(s, **kwargs) for a, s in zip(actors, shards)])

    def generate(self, prompts: list[str], n: int, cfg: RolloutConfig) -> list[list]:
        """Sample on all rollout workers; a dead worker is replaced (with current weights) and retried.

        Worker i samples with seed (seed, i, iteration): a resumed run, or a replaced worker, draws the very
        samples the first try would have drawn.
        """
        k = len(self.workers)
        shards = [prompts[i::k] for i in range(k)]
        seeds = [self._sample_seed(i) for i in range(k)]
        results: list = [None] * k
        futures = [w.generate.remote(shard, n, cfg, self.layout.separator, sd) for w, shard, sd in zip(self.workers, shards, seeds)]
        for i in range(k):
            for attempt in range(3):
                try:
                    results[i] = ray.get(futures[i])
                    break
                except ray.exceptions.RayActorError:
                    self.log({"event": "rollout_worker_replaced", "worker": i, "attempt": attempt})
                    self.workers[i] = self._new_worker(i)
                    if self.cfg.rollout.weight_sync == "collective":  # the group lost a member: rebuilt at next push
                        self.weight_spec = None
                        if self.state["iteration"] > 0:
                            self.weights_ref = ray.put(self._lead(self.policy, "state_dict"))
                    if self.state["iteration"] > 0:
                        ray.get(self.workers[i].update_weights.remote(self.weights_ref, self.state["iteration"]))
                    futures[i] = self.workers[i].generate.remote(shards[i], n, cfg, self.layout.separator, seeds[i])
            else:
                raise RuntimeError(f"rollout worker {i} died three times in a row")
        out: list = [None] * len(prompts)
        for i in range(k):
            for j, group in enumerate(results[i]):
                out[i + j * k] = group
        return out

    def push_weights(self, version: int) -> None:
        """The policy's new weights to every rollout worker and to the reward learners' pi_old."""
        if self.cfg.rollout.weight_sync == "collective":
            if self.weight_spec is None:
                self._build_weight_group()
            zero3 = self.cfg.learner.backend == "deepspeed" and self.cfg.learner.zero_stage == 3
            ray.get([a.broadcast_weights.remote() for a in (self.policy if zero3 else self.policy[:1])]
                    + [w.receive_weights.remote(self.weight_spec, version) for w in self.workers]
                    + [r.receive_pi_old.remote(self.weight_spec) for r in self.reward])
            return
        self.weights_ref = ray.put(self._lead(self.policy, "state_dict"))
        ray.get([w.update_weights.remote(self.weights_ref, version) for w in self.workers]
                + [r.update_pi_old.remote(self.weights_ref) for r in self.reward])

    def _build_weight_group(self) -> None:
        """One broadcast group: policy rank 0 (rank 0), the rollout workers, the reward learners."""
        c = self.cfg
        # NCCL needs every member on its own GPU: whole GPUs per actor. Fractional shares mean actors may sit
        # on one device (NCCL refuses duplicate GPUs), so they broadcast over gloo through host memory.
        backend = "nccl" if c.learner.num_gpus_per_worker >= 1 and c.rollout.num_gpus_per_worker >= 1 else "gloo"
        members = [self.policy[0], *self.workers, *self.reward]
        master = self._master("policy")
        ray.get([m.join_weight_group.remote(master, i, len(members), backend) for i, m in enumerate(members)])
        self.weight_spec = self._lead(self.policy, "weight_spec")

    def close(self, graceful: bool = True) -> None:
        """Leave the process groups (``graceful``: not when an actor died), stop every actor, free the placement
        group, close the logs."""
        from ray.util.placement_group import remove_placement_group

        if graceful:
            ray.get([a.shutdown.remote() for a in self.policy + self.reward])
        for a in self.policy + self.reward + self.workers:
            ray.kill(a)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.metrics.close()

    # ---------------------------------------------------------------- logging / checkpoints
    def log(self, row: dict) -> None:
        self.metrics.write({"iteration": self.state["iteration"], "time": round(time.time(), 2), **row},
                           self.state["iteration"])

    def checkpoint(self) -> Path:
        """Write this iteration's checkpoint (``runtime.checkpoints``: whole or not at all)."""
        it = self.state["iteration"]

        def save_models(tmp: Path) -> None:
            self._lead(self.policy, "save", str(tmp / "policy"))
            self._lead(self.reward, "save", str(tmp / "reward_model"), f"iter-{it}")
            ray.get([a.save_optimizer.remote(str(tmp / "optimizer" / role))
                     for role, group in (("policy", self.policy), ("reward", self.reward)) for a in group])

        self.state["rng"] = self.rng.getstate()
        state = {**self.state, "rng": _rng_to_json(self.state["rng"])}
        t0 = time.monotonic()
        path = write_checkpoint(self.out / "checkpoints", it, state, save_models)
        self.log({"event": "checkpoint", "path": str(path), "time_checkpoint_s": time.monotonic() - t0})
        return path

    def publish(self, reward_model: Path) -> None:
        """Load a new reward-model checkpoint into the running scoring app (``serve.publish_url``). A failed
        publish is logged and reported, never fatal: training goes on, the app keeps its model."""
        from dense_irl.serving.client import ScoreClientError, publish

        s = self.cfg.serve
        try:
            answer = publish(str(reward_model.resolve()), s.publish_url, s.token or None, s.timeout_s)
            self.log({"event": "published", "reward_model": str(reward_model), "version": answer.get("version"),
                      "replicas_updated": answer.get("replicas_updated")})
        except ScoreClientError as e:
            print(f"warning: serve.publish_url: {e}")
            self.log({"event": "publish_failed", "reward_model": str(reward_model), "error": str(e)})

    # ---------------------------------------------------------------- the loop
    def iteration(self) -> dict:
        """One iteration, phase by phase; returns its metrics (with each phase's wall time)."""
        c, t = self.cfg, {}
        t_start = time.monotonic()
        self.pop_compute()  # (what an evaluation or checkpoint ran since the last iteration is not this one's)
        batch, self.state["cursor"] = next_prompts(self.train, self.state["cursor"], c.prompts_per_iteration,
                                                   c.seed)
        t0 = time.monotonic()
        groups = self.generate([d.prompt for d in batch], c.rollout.samples_per_prompt, c.rollout)
        samples = [(d, r, g) for g, (d, group) in enumerate(zip(batch, groups)) for r in group if r.steps]
        outcomes = [float(is_correct(d, r.completion)) for d, r, _ in samples]
        negatives = [(d, r) for (d, r, _), o in zip(samples, outcomes) if c.policy_negatives == "all" or o == 0]
        t["rollout"] = time.monotonic() - t0

        t0 = time.monotonic()
        reward_metrics = {}
        for _ in range(c.reward_steps):
            rb = online_reward_batch(self.train, negatives, c.reward.batch_size, c.negative_mix,
                                     list(c.data.perturbations), self.rng)
            reward_metrics = self._on_all(self.reward, "reward_step", rb.shard(len(self.reward)))[0]
        t["reward"] = time.monotonic() - t0

        t0 = time.monotonic()
        rewards = self._lead(self.reward, "score", [(d.prompt, r.steps) for d, r, _ in samples])
        t["score"] = time.monotonic() - t0

        t0 = time.monotonic()
        adv = compute_advantages(c.rl.advantages, rewards, [g for _, _, g in samples],
                                 [r.steps for _, r, _ in samples], gamma=c.rl.gamma, alpha=c.reward.alpha,
                                 outcomes=outcomes, outcome_weight=c.rl.outcome_weight)
        experience = Experience([r for _, r, _ in samples], adv, [(d.prompt, d.steps) for d in batch])
        t["advantages"] = time.monotonic() - t0

        t0 = time.monotonic()
        policy_metrics = self._on_all(self.policy, "policy_step", experience.shard(len(self.policy)), rl=c.rl)[0]
        t["policy"] = time.monotonic() - t0

        t0 = time.monotonic()
        self.state["iteration"] += 1
        self.push_weights(self.state["iteration"])
        t["sync"] = time.monotonic() - t0
        compute = self.pop_compute()
        t["iteration"] = time.monotonic() - t_start
        n = max(1, len(samples))
        return {
            "batch_ids": [d.id for d in batch], "samples": len(samples), "accuracy_samples": sum(outcomes) / n,
            "step_reward_mean": sum(sum(r) for r in rewards) / max(1, sum(len(r) for r in rewards)),
            **{f"reward/{k}": v for k, v in reward_metrics.items()},
            **{f"policy/{k}": v for k, v in policy_metrics.items()},
            **{f"time_{k}_s": v for k, v in t.items()},
            **{f"compute_{k}_s": v for k, v in compute.items()},
        }

    def pop_compute(self) -> dict[str, float]:
        """Each phase's compute time inside the actors since the last call (``runtime.timing``)."""
        return collect_compute(self.policy, self.reward + self.workers)

    def periodic_eval(self) -> dict:
        """Reward model: localisation F1 on held-out perturbed chains; policy: accuracy on held-out prompts."""
        rows = make_processbench(self.eval_demos, kinds=self.cfg.data.perturbations, seed=self.cfg.seed + 11)
        half = len(rows) // 2
        scores = self._lead(self.reward, "score", [(r["problem"], r["steps"]) for r in rows])
        cal_labels = [r["label"] for r in rows[:half]]
        # Calibration needs erroneous and correct chains; a few eval prompts may give only one kind.
        calibrate = half >= 2 and min(cal_labels) < 0 <= max(cal_labels)
        thr = calibrate_threshold(scores[:half], cal_labels, [len(r["steps"]) for r in rows[:half]]) if calibrate else 0.0
        m = processbench_metrics([first_error(s, thr) for s in scores[half:]], [r["label"] for r in rows[half:]])
        if calibrate:  # the checkpoints (and a server loading them) then flag first errors by this threshold
            rule = (f"maximises F1 on {half} held-out perturbed chains (calibration demos) at iteration "
                    f"{self.state['iteration']}")
            ray.get([r.set_threshold.remote(thr, rule) for r in self.reward])
        groups = self.generate([d.prompt for d in self.eval_demos], 1, replace(self.cfg.rollout, temperature=0.0))
        acc = sum(is_correct(d, g[0].completion) for d, g in zip(self.eval_demos, groups)) / len(groups)
        return {"eval/localisation_f1": m["f1"] or 0.0, "eval/policy_accuracy": acc, "eval/threshold": thr}


def _rng_to_json(state) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _init_ray() -> None:
    if not ray.is_initialized():
        from dense_irl.logs import ray_init_kwargs

        ray.init(address=os.environ.get("RAY_ADDRESS"), **ray_init_kwargs())


def start_driver(cfg: LoopConfig) -> Driver:
    """A driver with its actors up: resumed from a checkpoint, or after the SFT warm start."""
    cfg.check()
    _init_ray()
    drv = Driver(cfg)
    save_config(cfg, drv.out / "config.yaml")
    resume_from = latest_checkpoint(drv.out) if cfg.resume == "auto" else (
        Path(cfg.resume) if cfg.resume != "no" else None)
    if resume_from is not None:
        st = read_state(resume_from)
        drv.state = {**drv.state, **st, "rng": None}
        drv.rng.setstate(_rng_from_json(st["rng"]))
        ref = st.get("reference")
        if ref is not None and not (Path(ref) / "config.json").is_file():
            raise MissingFileError(f"resume: the KL reference policy {ref} named in {resume_from / 'state.json'} "
                                   "is gone; restore that folder (the run's init/sft_policy) to resume")
        # (a checkpoint without a reference predates it being recorded: its policy becomes the reference)
        drv.start_actors(str(resume_from / "policy"), str(resume_from / "reward_model"),
                         ref or str(resume_from / "policy"))
        optim = resume_from / "optimizer"
        if optim.is_dir():
            ray.get([a.load_optimizer.remote(str(optim / role))
                     for role, group in (("policy", drv.policy), ("reward", drv.reward)) for a in group])
        drv.push_weights(drv.state["iteration"])
        drv.log({"event": "resumed", "from": str(resume_from), "optimizer_state": optim.is_dir()})
    else:
        sft, reward_init = warm_start(drv)
        drv.state["reference"] = str(sft.resolve())
        drv.start_actors(str(sft), str(reward_init), str(sft))
    return drv


def train_online(cfg: LoopConfig, report=None) -> dict:
    """Run the loop (starting Ray locally when no cluster is connected); returns the last metrics.

    ``report(metrics: dict, checkpoint: Path | None)``, when given, is called after every iteration
    with that iteration's metrics (evaluation included when it ran) and the checkpoint folder when one
    was written (Ray Tune hooks in here).
    """
    cfg.check()
    _init_ray()
    with GracefulStop() as stop:  # after ray.init: Ray's core worker would otherwise abort on SIGTERM
        return run_iterations(start_driver(cfg), report, stop)


def run_iterations(drv: Driver, report=None, stop: GracefulStop | None = None) -> dict:
    """The iterations of a started driver (see :func:`train_online`), then its actors are stopped. SIGTERM or
    SIGINT ends the run after the current iteration and its checkpoint (``runtime.stopping``)."""
    try:
        with contextlib.nullcontext(stop) if stop is not None else GracefulStop() as stop:
            return _iterate(drv, report, stop)
    except ray.exceptions.RayActorError as e:
        raise actor_died(drv, e, latest_checkpoint(drv.out)) from None


def _checkpoint(drv: Driver) -> Path:
    ckpt = drv.checkpoint()
    if drv.cfg.serve.publish_url:
        drv.publish(ckpt / "reward_model")
    return ckpt


def _iterate(drv: Driver, report, stop: GracefulStop) -> dict:
    cfg, last = drv.cfg, {}
    deadline = time.monotonic() + 60 * cfg.minutes if cfg.minutes > 0 else float("inf")
    bar = tqdm(total=cfg.iterations, initial=drv.state["iteration"], desc="irl", unit="iter")
    while drv.state["iteration"] < cfg.iterations:
        if stop.requested:  # signalled before the first iteration (during the warm start): nothing new to save
            drv.log({"event": "stopped", "signal": stop.requested, "checkpoint": None})
            break
        last = drv.iteration()
        drv.log(last)
        it = drv.state["iteration"]
        bar.set_postfix(acc=f"{last['accuracy_samples']:.3f}", refresh=False)
        out_of_time = time.monotonic() > deadline
        if cfg.eval_every and it % cfg.eval_every == 0:
            t0 = time.monotonic()
            ev = drv.periodic_eval()
            ev["time_eval_s"] = time.monotonic() - t0
            drv.log(ev)
            last |= ev
        ckpt = None
        if cfg.checkpoint_every and (it % cfg.checkpoint_every == 0 or it == cfg.iterations or out_of_time):
            ckpt = _checkpoint(drv)
        if report is not None:
            report({"iteration": it, **{k: v for k, v in last.items() if k != "batch_ids"}}, ckpt)
        bar.update(1)
        if out_of_time:
            drv.log({"event": "time_budget_reached", "minutes": cfg.minutes})
            break
        if stop.requested:  # SIGTERM / SIGINT during this iteration: end it with a checkpoint
            ckpt = ckpt or (_checkpoint(drv) if cfg.checkpoint_every else None)
            drv.log({"event": "stopped", "signal": stop.requested, "checkpoint": str(ckpt) if ckpt else None})
            break
    bar.close()
    drv.close()
    return last
