"""Tests of valueloss.experiments: toy critic, PPO, statistics, CLI, figures and the explorer."""

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import fresh
import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from valueloss import experiments
from valueloss.experiments import cli, figures, ppo, results, stats, toy_critic
from valueloss.experiments.explorer import ToyCriticExplorer

TINY_PPO = dict(total_timesteps=128, num_envs=2, num_steps=32, num_minibatches=2, update_epochs=2, hidden=16)
TINY_TOY = dict(num_iterations=6, update_epochs=2, num_samples=64, hidden=16)
SHIPPED_PPO = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "ppo_cartpole.json"


# ---------------------------------------------------------------------------------------------- toy critic


def test_toy_critic_is_deterministic_for_a_seed():
    """The same configuration gives bit-identical curves; another seed gives different ones."""
    config = toy_critic.ToyCriticConfig(scale=10.0, clip_eps=0.5, **TINY_TOY)
    first, second = toy_critic.run_toy_critic(config), toy_critic.run_toy_critic(config)
    other = toy_critic.run_toy_critic(config.replace(seed=1))
    for key in ("relative_error", "explained_variance", "clip_fraction"):
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key].shape == (config.num_iterations + 1,)
    assert not np.array_equal(first["relative_error"], other["relative_error"])


def test_toy_critic_initial_error_matches_an_independent_computation():
    """Index 0 is ||v0 - R|| / ||R - mean R|| of the untrained network, recomputed here in float64."""
    config = toy_critic.ToyCriticConfig(scale=3.0, **TINY_TOY)
    inputs, unit_targets = toy_critic.make_toy_problem(config.num_samples, config.input_dim, config.seed)
    assert abs(unit_targets.double().mean().item()) < 1e-6
    assert unit_targets.double().std(correction=0).item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(config.seed)
    net = torch.nn.Sequential(torch.nn.Linear(config.input_dim, config.hidden), torch.nn.Tanh(),
                              torch.nn.Linear(config.hidden, config.hidden), torch.nn.Tanh(),
                              torch.nn.Linear(config.hidden, 1)).double()
    with torch.no_grad():
        v0 = net(inputs.double()).squeeze(-1)
    returns = 3.0 * unit_targets.double()
    expected = math.sqrt(((v0 - returns) ** 2).sum().item() / ((returns - returns.mean()) ** 2).sum().item())
    assert toy_critic.run_toy_critic(config)["relative_error"][0] == pytest.approx(expected, rel=1e-5)


def test_toy_critic_large_scale_fixed_clip_is_slower_and_clips_most_samples():
    """At scale 100, clip_eps=0.2 zeroes most value gradients and leaves a larger error than no clipping."""
    base = toy_critic.ToyCriticConfig(scale=100.0, num_iterations=5)
    free, clipped = toy_critic.run_toy_critic(base), toy_critic.run_toy_critic(base.replace(clip_eps=0.2))
    np.testing.assert_array_equal(free["clip_fraction"], 0.0)
    assert clipped["clip_fraction"][1] > 0.5
    assert clipped["relative_error"][-1] > free["relative_error"][-1] + 0.2


def test_toy_critic_normalised_returns_are_scale_free():
    """With normalised returns, relative error and clip fraction do not depend on the scale."""
    base = toy_critic.ToyCriticConfig(clip_eps=0.2, normalize_returns=True, **TINY_TOY)
    small, large = toy_critic.run_toy_critic(base), toy_critic.run_toy_critic(base.replace(scale=1000.0))
    np.testing.assert_allclose(large["relative_error"], small["relative_error"], rtol=1e-4)
    np.testing.assert_allclose(large["clip_fraction"], small["clip_fraction"], atol=1e-6)


def test_iterations_to_reach_and_bad_toy_arguments():
    """iterations_to_reach returns the first index at or below the threshold; bad settings name the argument."""
    assert toy_critic.iterations_to_reach([0.9, 0.05, 0.01]) == 1
    assert toy_critic.iterations_to_reach([0.9, 0.5]) is None
    with pytest.raises(ValueError, match="scale"):
        toy_critic.ToyCriticConfig(scale=0.0)
    with pytest.raises(ValueError, match="clip_eps"):
        toy_critic.ToyCriticConfig(clip_eps=-0.1)
    with pytest.raises(ValueError, match="num_samples"):
        toy_critic.ToyCriticConfig(num_samples=10, num_minibatches=3)


# ---------------------------------------------------------------------------------------------------- PPO


def _reference_gae(rewards, values, episode_ends, next_values, gamma, lam):
    """A_t = sum_k (gamma*lam)^k delta_{t+k}, summing forward until the episode ends (plain Python floats)."""
    num_steps, num_envs = len(rewards), len(rewards[0])
    advantages = [[0.0] * num_envs for _ in range(num_steps)]
    for env in range(num_envs):
        for t in range(num_steps):
            total, weight = 0.0, 1.0
            for k in range(t, num_steps):
                value_after = next_values[env] if k == num_steps - 1 else values[k + 1][env]
                alive = 0.0 if episode_ends[k][env] else 1.0
                delta = rewards[k][env] + gamma * alive * value_after - values[k][env]
                total += weight * delta
                if episode_ends[k][env]:
                    break
                weight *= gamma * lam
            advantages[t][env] = total
    return advantages


def test_gae_matches_a_forward_sum_reference():
    """compute_gae equals the forward-sum definition of GAE, episode ends included, on awkward sizes."""
    generator = torch.Generator().manual_seed(3)
    for num_steps, num_envs in [(1, 1), (7, 3), (41, 2)]:
        rewards = torch.randn(num_steps, num_envs, generator=generator, dtype=torch.float64)
        values = torch.randn(num_steps, num_envs, generator=generator, dtype=torch.float64)
        ends = (torch.rand(num_steps, num_envs, generator=generator) < 0.2).double()
        next_values = torch.randn(num_envs, generator=generator, dtype=torch.float64)
        advantages, returns = ppo.compute_gae(rewards, values, ends, next_values, gamma=0.97, gae_lambda=0.9)
        expected = _reference_gae(rewards.tolist(), values.tolist(), ends.tolist(), next_values.tolist(), 0.97, 0.9)
        torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(returns, advantages + values)


def test_gae_rejects_mismatched_shapes():
    """compute_gae names the inputs whose shapes disagree."""
    with pytest.raises(ValueError, match="next_values"):
        ppo.compute_gae(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3), gamma=0.9,
                        gae_lambda=0.9)
    with pytest.raises(ValueError, match="same"):
        ppo.compute_gae(torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(2), gamma=0.9,
                        gae_lambda=0.9)


def test_running_mean_std_and_reward_scaler_match_numpy():
    """Merged batch statistics equal numpy's over all data; the scaler divides by sqrt of that variance."""
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 5, 17)]
    running = ppo.RunningMeanStd()
    for batch in batches:
        running.update(batch)
    data = np.concatenate(batches)
    assert running.mean == pytest.approx(data.mean(), rel=1e-4)
    assert running.var == pytest.approx(data.var(), rel=1e-4)

    scaler = ppo.RewardScaler(num_envs=2, gamma=0.5)
    returns_seen = []
    discounted = np.zeros(2)
    for rewards, ends in [([1.0, 2.0], [False, True]), ([1.0, 1.0], [False, False])]:
        discounted = discounted * 0.5 + np.array(rewards)
        returns_seen.extend(discounted)
        scaled = scaler(np.array(rewards), np.array(ends))
        discounted[np.array(ends)] = 0.0
    np.testing.assert_allclose(scaled, np.array([1.0, 1.0]) / np.sqrt(np.var(returns_seen)), rtol=1e-3)


def test_ppo_is_deterministic_for_a_seed():
    """Same seed, same numbers in every curve; another seed differs."""
    config = ppo.PPOConfig(value_clip_eps=0.2, reward_scaling=True, **TINY_PPO)
    first, second = ppo.run_ppo(config, seed=1), ppo.run_ppo(config, seed=1)
    assert first == second
    assert set(first) == set(ppo.CURVE_KEYS)
    assert first["global_step"] == [64.0, 128.0]
    assert ppo.run_ppo(config, seed=2)["value_loss"] != first["value_loss"]


def test_ppo_value_clipping_switch_reaches_the_loss():
    """Without value clipping the clip fraction is exactly 0; with a tiny clip_eps on raw rewards it is not."""
    free = ppo.run_ppo(ppo.PPOConfig(value_clip_eps=None, **TINY_PPO), seed=0)
    tight = ppo.run_ppo(ppo.PPOConfig(value_clip_eps=1e-3, **TINY_PPO), seed=0)
    assert free["value_clip_fraction"] == [0.0, 0.0]
    assert tight["value_clip_fraction"][-1] > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("value_clip_eps, reward_scaling", [(None, False), (0.2, False), (None, True), (0.2, True)])
def test_ppo_reproduces_a_shipped_run(value_clip_eps, reward_scaling):
    """run_ppo with a shipped run's configuration and seed gives notebook 06's stored numbers (~2 min per run)."""
    shipped = json.loads(SHIPPED_PPO.read_text())["runs"]
    run = next(r for r in shipped if (r["config"]["value_clip_eps"], r["config"]["reward_scaling"])
               == (value_clip_eps, reward_scaling))
    fresh = ppo.run_ppo(ppo.PPOConfig(**run["config"]), seed=run["seed"])
    for key in ppo.CURVE_KEYS:
        assert [cli._round(x) for x in fresh[key]] == run["curves"][key], key


def test_ppo_update_is_one_readable_update_with_the_value_loss_in_it():
    """ppo_update, shown in notebook 06, is about 40 lines and holds the value loss, vf_coef, the optimiser step
    and the gradient-norm clip."""
    import inspect

    source = inspect.getsource(ppo.ppo_update)
    assert len(source.splitlines()) <= 50
    for part in ("ValueLoss(", "vf_coef * value_loss", "clip_grad_norm_", "optimizer.step()"):
        assert part in source, part


def test_ppo_config_errors_name_the_argument():
    """Invalid PPO settings raise ValueError naming the setting."""
    with pytest.raises(ValueError, match="num_minibatches"):
        ppo.PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(ValueError, match="total_timesteps"):
        ppo.PPOConfig(total_timesteps=10)
    with pytest.raises(ValueError, match="value_clip_eps"):
        ppo.PPOConfig(value_clip_eps=-1.0)


# -------------------------------------------------------------------------------------------------- stats


def test_iqm_is_the_mean_of_the_middle_half():
    """IQM of 8 scores = mean of the sorted 3rd..6th; of 5 scores = mean of the middle 3."""
    scores = [9.0, 1.0, 7.0, 3.0, 100.0, 5.0, -50.0, 4.0]
    middle = sorted(scores)[2:6]
    assert stats.iqm(scores) == pytest.approx(sum(middle) / 4)
    assert stats.iqm([5.0, 1.0, 3.0, 2.0, 1000.0]) == pytest.approx((2.0 + 3.0 + 5.0) / 3)
    with pytest.raises(ValueError, match="finite"):
        stats.iqm([1.0, float("nan")])


def test_bootstrap_ci_agrees_with_scipy_bootstrap():
    """One task: the percentile interval of the IQM matches scipy.stats.bootstrap's within Monte Carlo error."""
    scores = np.random.default_rng(1).normal(100.0, 20.0, size=12)
    estimate, low, high = stats.stratified_bootstrap_ci(scores, reps=4000, seed=0)
    reference = scipy_stats.bootstrap((scores,), lambda x, axis: scipy_stats.trim_mean(x, 0.25, axis=axis),
                                      n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert estimate == pytest.approx(scipy_stats.trim_mean(scores, 0.25))
    width = reference.high - reference.low
    assert low == pytest.approx(reference.low, abs=0.1 * width)
    assert high == pytest.approx(reference.high, abs=0.1 * width)


def test_bootstrap_of_the_iqm_is_the_iqm_of_every_resample():
    """The default statistic (iqm, computed for all resamples at once) gives exactly the interval of iqm called on
    each resample, for one task and for several."""
    rng = np.random.default_rng(4)
    for scores in (rng.normal(100.0, 30.0, size=6), rng.normal(size=(7, 3)), rng.normal(size=1)):
        fast = stats.stratified_bootstrap_ci(scores, reps=500, seed=2)
        one_by_one = stats.stratified_bootstrap_ci(scores, statistic=lambda sample: stats.iqm(sample), reps=500, seed=2)
        assert fast == one_by_one
        assert fast[0] == stats.iqm(scores) and fast[1] <= fast[2]


def test_bootstrap_is_stratified_by_task():
    """Resampling stays within each task column: the mean of task 0 alone never changes."""
    scores = np.column_stack([np.ones(6), np.arange(6) * 100.0])
    estimate, low, high = stats.stratified_bootstrap_ci(scores, statistic=lambda t: float(t[:, 0].mean()), reps=200)
    assert (estimate, low, high) == (1.0, 1.0, 1.0)


def test_iqm_difference_and_curve_bands():
    """A constant shift is recovered exactly; curve bands are IQMs of each column and bracket them."""
    assert stats.iqm_difference_ci(np.full(5, 15.0), np.full(7, 5.0)) == (10.0, 10.0, 10.0)
    same = np.random.default_rng(3).normal(size=(2, 10))
    estimate, low, high = stats.iqm_difference_ci(same[0], same[1], reps=500)
    assert low < 0.0 < high and low <= estimate <= high
    curves = np.random.default_rng(2).normal(size=(8, 5))
    center, low, high = stats.curve_iqm_ci(curves, reps=300)
    expected = [np.mean(np.sort(curves[:, j])[2:6]) for j in range(5)]
    np.testing.assert_allclose(center, expected)
    assert np.all(low <= center + 1e-12) and np.all(center <= high + 1e-12)


# ---------------------------------------------------------------------------------------------------- CLI


def _cli_args(tmp_path, out="out.json", seeds=2):
    return ["ppo", "--value-clip-eps", "none", "0.2", "--reward-scaling", "off", "--num-seeds", str(seeds),
            "--total-timesteps", "128", "--num-envs", "2", "--num-steps", "64", "--workers", "1", "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out)]


def test_cli_reuses_cached_runs(tmp_path, monkeypatch):
    """A second identical command reads every run from the cache (training is never called) and writes the same runs."""
    first = cli.main(_cli_args(tmp_path))
    assert len(list((tmp_path / "cache").glob("ppo-*.json"))) == 4
    assert first["environment"]["runs_from_cache"] == 0

    def fail(*args, **kwargs):
        raise AssertionError("run_ppo was called although the run is cached")

    monkeypatch.setattr(cli, "run_ppo", fail)
    second = cli.main(_cli_args(tmp_path, out="again.json"))
    assert second["environment"]["runs_from_cache"] == 4
    assert second["runs"] == first["runs"]
    assert json.loads((tmp_path / "again.json").read_text())["runs"] == first["runs"]


def test_cli_reproduces_a_configuration_identically(tmp_path):
    """Without the cache, the CLI's numbers equal a direct run_ppo call (rounded) and the recorded command re-runs."""
    written = cli.main(_cli_args(tmp_path, seeds=1) + ["--no-cache", "--csv", str(tmp_path / "out.csv")])
    config = ppo.PPOConfig(total_timesteps=128, num_envs=2, num_steps=64, value_clip_eps=0.2)
    direct = ppo.run_ppo(config, seed=0)
    run = written["runs"][1]
    assert run["config"] == config.to_dict() and run["seed"] == 0
    for key in ppo.CURVE_KEYS:
        assert run["curves"][key] == [float(f"{x:.6g}") for x in direct[key]]
    assert written["command"].startswith("python -m valueloss.experiments ppo --value-clip-eps none 0.2")
    rerun = cli.main(written["command"].split()[3:-2] + ["--out", str(tmp_path / "rerun.json")])
    assert rerun["runs"] == written["runs"]
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0].startswith("value_clip_eps,reward_scaling,seed,iteration")
    assert len(rows) == 1 + 2 * 1  # a header, then two runs of one iteration each


def test_results_helpers_group_and_score_runs(tmp_path):
    """Runs group by condition; final scores average the last iterations; missing values become NaN."""
    run = {"config": {"value_clip_eps": 0.2, "reward_scaling": True}, "seed": 0,
           "curves": {"episodic_return": [None, 10.0, 20.0, 30.0], "global_step": [1, 2, 3, 4]}}
    data = {"command": "x", "runs": [run, {**run, "config": {"value_clip_eps": None, "reward_scaling": False}}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    loaded = results.load_results(tmp_path / "r.json")
    assert list(results.runs_by_condition(loaded)) == ["clip 0.2, scaled rewards", "no clip, raw rewards"]
    assert np.isnan(results.curve_matrix([run], "episodic_return")[0, 0])
    np.testing.assert_allclose(results.final_scores([run], last_fraction=0.5), [25.0])
    np.testing.assert_allclose(results.window_scores([run], 2, 3), [15.0])
    with pytest.raises(ValueError, match="no iteration"):
        results.window_scores([run], 10, 20)


# ------------------------------------------------------------------------------------- figures and explorer


def test_figures_draw_the_data(tmp_path):
    """Learning curves plot the IQM of each condition; the final-score plot marks every seed."""
    runs = [{"config": {"value_clip_eps": clip, "reward_scaling": False}, "seed": s,
             "curves": {"global_step": [1.0, 2.0, 3.0, 4.0], "episodic_return": [s, s + 1.0, s + 2.0, s + 3.0]}}
            for clip in (None, 0.2) for s in range(4)]
    data = {"command": "x", "runs": runs}
    ax = figures.plot_learning_curves(data, reps=50)
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(line.get_ydata(), [1.5, 2.5, 3.5, 4.5])  # IQM of seeds 0..3 = mean of 1 and 2, + t
    ax = figures.plot_final_scores(data, last_fraction=0.25, reps=50)
    seeds = [l for l in ax.get_lines() if l.get_marker() == "x"]
    np.testing.assert_allclose(seeds[0].get_xdata(), [3.0, 4.0, 5.0, 6.0])
    curves = {"a": {"relative_error": np.array([1.0, 0.5, 0.25])}}
    ax = figures.plot_toy_curves(curves, threshold=0.05)
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1.0, 0.5, 0.25])


def test_figures_draw_the_2x2_design_as_colour_and_line_style():
    """In the PPO figures colour follows value clipping and line style (and marker) follows reward scaling."""
    runs = [{"config": {"value_clip_eps": clip, "reward_scaling": scaled, "total_timesteps": 2}, "seed": s,
             "curves": {"global_step": [1.0, 2.0], "episodic_return": [1.0 + s, 2.0 + s]}}
            for scaled in (True, False) for clip in (0.2, None) for s in range(2)]
    data = {"command": "x", "runs": runs}
    ax = figures.plot_learning_curves(data, reps=20)
    lines = {line.get_label().split(" (n=")[0]: line for line in ax.get_lines()}
    assert len(lines) == 4
    for label, line in lines.items():
        assert line.get_color() == figures.CLIP_COLORS[0 if label.startswith("no clip") else 1], label
        assert line.get_linestyle() == ("--" if "scaled" in label else "-"), label
    ax = figures.plot_final_scores(data, reps=20)
    markers = [l.get_marker() for l in ax.get_lines() if l.get_marker() in ("o", "s")]
    assert markers == ["s", "s", "o", "o"]  # conditions in order: scaled (clip, none), raw (clip, none)
    assert figures.key_figure(data, reps=20).get_figwidth() <= 11


def test_explorer_controls_rerun_the_toy_critic():
    """Moving the clip_eps slider re-runs the critic: the curve changes and equals a direct run."""
    base = toy_critic.ToyCriticConfig(**TINY_TOY)
    explorer = ToyCriticExplorer(scale=100.0, clip_eps=0.2, base=base)
    before = np.array(explorer.lines["error"].get_ydata())
    explorer.clip_eps.value = 20.0
    after = np.array(explorer.lines["error"].get_ydata())
    expected = toy_critic.run_toy_critic(base.replace(scale=100.0, clip_eps=explorer.clip_eps.value))
    np.testing.assert_allclose(after, expected["relative_error"])
    assert not np.allclose(before, after)
    explorer.no_clip.value = True
    np.testing.assert_allclose(explorer.lines["error"].get_ydata(), explorer.lines["baseline_error"].get_ydata())
    assert "no clipping" in explorer.summary.value and explorer.image.value[:4] == b"\x89PNG"


def test_importing_experiments_leaves_scipy_for_the_statistics():
    """valueloss.experiments, its CLI (each worker process imports it) and its figures import scipy only when a
    statistic is first used (in a fresh interpreter, tests/fresh.py); the statistics are still package attributes."""
    modules = fresh.stage("import valueloss.experiments")["modules"]
    assert "valueloss.experiments.cli" in modules and "gymnasium" in modules
    assert [m for m in modules if m.split(".")[0] == "scipy" or m == "valueloss.experiments.stats"] == []
    assert experiments.iqm is stats.iqm and experiments.stratified_bootstrap_ci is stats.stratified_bootstrap_ci
    assert {"iqm", "curve_iqm_ci", "run_ppo"} <= set(dir(experiments))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        experiments.nope  # noqa: B018


def test_explorer_runs_each_setting_once_and_shows_runs_handed_in(monkeypatch):
    """Runs handed in are drawn as given and not run again; a setting shown before is redrawn from its run;
    anything else in runs is refused naming runs."""
    import valueloss.experiments.explorer as explorer_module

    base = toy_critic.ToyCriticConfig(**TINY_TOY)
    chosen, baseline = base.replace(scale=100.0, clip_eps=0.2), base.replace(scale=100.0)
    marked = {config: {key: np.full(base.num_iterations + 1, 0.5 + i) for key in ("relative_error", "clip_fraction")}
              for i, config in enumerate((chosen, baseline))}
    calls = []
    monkeypatch.setattr(explorer_module, "run_toy_critic", lambda config: calls.append(config)
                        or toy_critic.run_toy_critic(config))
    explorer = ToyCriticExplorer(scale=100.0, clip_eps=0.2, base=base, runs=marked)
    assert calls == [] and explorer.config() == chosen
    np.testing.assert_array_equal(explorer.lines["error"].get_ydata(), marked[chosen]["relative_error"])
    np.testing.assert_array_equal(explorer.lines["baseline_error"].get_ydata(), marked[baseline]["relative_error"])
    explorer.clip_eps.value = 20.0
    assert calls == [base.replace(scale=100.0, clip_eps=explorer.clip_eps.value)]
    explorer.clip_eps.value = 0.2
    assert len(calls) == 1
    np.testing.assert_array_equal(explorer.lines["error"].get_ydata(), marked[chosen]["relative_error"])
    with pytest.raises(TypeError, match="runs must map ToyCriticConfig"):
        ToyCriticExplorer(base=base, runs={0.2: marked[chosen]})
    with pytest.raises(ValueError, match=r"runs\[.*\] is not a run_toy_critic result: it has no \['clip_fraction'\]"):
        ToyCriticExplorer(base=base, runs={chosen: {"relative_error": [1.0]}})


def test_cli_rejects_bad_arguments_and_draws_the_key_figure(tmp_path, capsys):
    """Bad --value-clip-eps / --reward-scaling values exit with a message; `figure` writes a PNG of a results file."""
    for bad in (["--value-clip-eps", "-1"], ["--reward-scaling", "maybe"]):
        with pytest.raises(SystemExit):
            cli.main(["ppo", *bad, "--out", str(tmp_path / "x.json")])
        assert "expected" in capsys.readouterr().err
    runs = [{"config": {"value_clip_eps": clip, "reward_scaling": True, "total_timesteps": 8}, "seed": s,
             "curves": {"global_step": [4.0, 8.0], "episodic_return": [10.0 + s, 20.0 + s]}}
            for clip in (None, 0.2) for s in range(3)]
    (tmp_path / "r.json").write_text(json.dumps({"command": "x", "runs": runs}))
    cli.main(["figure", str(tmp_path / "r.json"), "--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------- cache, locks, orphans


def _fake_run_ppo(calls, delay=0.0):
    """A stand-in for run_ppo: records each (clip, seed) and returns tiny curves."""
    def run(config, seed, progress=None):
        calls.append((config.value_clip_eps, seed))
        time.sleep(delay)
        return {key: [float(seed), 1.0] for key in ppo.CURVE_KEYS}
    return run


def _grid(tmp_path, **kwargs):
    config = ppo.PPOConfig(**{k: v for k, v in TINY_PPO.items() if k != "update_epochs"})
    return cli.run_grid([config], [0], workers=1, cache_dir=tmp_path / "cache", show_progress=False, **kwargs)


@pytest.mark.parametrize("content", ['{"config": 1}', "[1, 2]", '{"curves": {}}', "not json {"])
def test_a_corrupt_cache_entry_is_named_recomputed_and_overwritten(tmp_path, monkeypatch, content):
    """A cache file of the wrong structure: a warning naming the file, the run recomputed, the file rewritten."""
    calls = []
    monkeypatch.setattr(cli, "run_ppo", _fake_run_ppo(calls))
    first = _grid(tmp_path)
    (entry,) = (tmp_path / "cache").glob("ppo-*.json")
    if content.startswith('{"curves"'):  # the right config and seed, but no curves
        content = json.dumps({**json.loads(entry.read_text()), "curves": {"episodic_return": "x"}})
    entry.write_text(content)
    with pytest.warns(UserWarning, match=f"cache entry {entry} .*; recomputing the run and overwriting it"):
        again = _grid(tmp_path)
    assert calls == [(None, 0), (None, 0)] and again[0]["curves"] == first[0]["curves"]
    assert json.loads(entry.read_text())["curves"] == first[0]["curves"]
    assert _grid(tmp_path)[0]["cached"] and len(calls) == 2  # the rewritten entry is used


def test_a_directory_in_place_of_a_cache_entry_is_computed_without_leftovers(tmp_path, monkeypatch):
    """A directory where a cache file belongs: a warning, the run computed, no .tmp left, the directory untouched."""
    calls = []
    monkeypatch.setattr(cli, "run_ppo", _fake_run_ppo(calls))
    config = ppo.PPOConfig(**{k: v for k, v in TINY_PPO.items() if k != "update_epochs"})
    (tmp_path / "cache" / f"{cli.run_key(config, 0)}.json").mkdir(parents=True)
    with pytest.warns(UserWarning, match="is not a regular file"):
        runs = _grid(tmp_path)
    assert calls == [(None, 0)] and runs[0]["curves"]["episodic_return"] == [0.0, 1.0]
    assert list((tmp_path / "cache").glob("*.tmp")) == []
    assert (tmp_path / "cache" / f"{cli.run_key(config, 0)}.json").is_dir()


def test_a_failed_cache_write_leaves_no_tmp(tmp_path):
    """If the final rename fails the temporary file is removed and a warning names the entry."""
    target = tmp_path / "entry.json"
    target.mkdir()
    (target / "occupied").write_text("x")  # os.replace onto a non-empty directory fails
    with pytest.warns(UserWarning, match=f"could not write cache entry {target}"):
        cli._write_cache(str(target), {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_two_concurrent_grids_compute_each_run_once(tmp_path, monkeypatch):
    """Two grids started together on one cache: the run lock makes every run computed exactly once."""
    calls = []
    monkeypatch.setattr(cli, "run_ppo", _fake_run_ppo(calls, delay=0.3))
    config = ppo.PPOConfig(**{k: v for k, v in TINY_PPO.items() if k != "update_epochs"})
    configs = [config, dataclasses.replace(config, value_clip_eps=0.2)]
    outputs = [None, None]

    def grid(slot):
        outputs[slot] = cli.run_grid(configs, [0, 1], workers=1, cache_dir=tmp_path / "cache", show_progress=False)

    threads = [threading.Thread(target=grid, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(calls, key=str) == sorted({(c.value_clip_eps, s) for c in configs for s in (0, 1)}, key=str)
    assert [r["curves"] for r in outputs[0]] == [r["curves"] for r in outputs[1]]
    assert sum(r["cached"] for r in outputs[0] + outputs[1]) == 4


def _descendants(pid):
    """Every live descendant of ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux's /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of `python -m valueloss.experiments ppo --workers 2`: no worker (nor helper) outlives it by 20 s.

    (A worker still importing torch when the parent dies exits as soon as its initializer runs: seconds.)"""
    args = [sys.executable, "-m", "valueloss.experiments", "ppo", "--num-seeds", "2", "--total-timesteps", "10000000",
            "--workers", "2", "--quiet", "--no-cache", "--out", str(tmp_path / "out.json")]
    parent = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(workers := _descendants(parent.pid)) < 3 and time.monotonic() < deadline:  # 2 workers + tracker
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are past their initializer
        workers = _descendants(parent.pid)
        assert len(workers) >= 2, workers
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # clean up before failing
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} of {len(workers)} child processes outlived the killed parent"


@pytest.mark.parametrize("content", ["[1]", "not json", '{"command": "x", "runs": [{"config": {}, "seed": 0}]}',
                                     '{"command": "x", "runs": [{"config": {}, "seed": 0, "curves": {"a": "b"}}]}'])
def test_a_malformed_results_file_is_named(tmp_path, capsys, content):
    """load_results names the file and the problem; the figure command exits 2 with that one line."""
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path} is not a valueloss results file: "):
        results.load_results(path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["figure", str(path), "--out", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("python -m valueloss.experiments figure: error: ")
    assert err.count("\n") == 1 and str(path) in err and not (tmp_path / "f.png").exists()
