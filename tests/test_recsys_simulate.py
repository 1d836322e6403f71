"""The recommender's simulator (stages.recsys.simulate): its gateway items pay only later, so that
CRR beats BC online, end to end."""

from __future__ import annotations

import json
import math

import numpy as np

from tests.conftest import invoke


def test_the_simulators_gateways_pay_only_later():
    """Ground truth: showing the gateway items first beats the likeliest-click policy online,
    although their next click is less likely, and the behaviour policy rarely consumes them."""
    from stages.recsys.simulate import SimulatorConfig, World, online_return, simulate_logs

    config = SimulatorConfig(sim_users=300)
    world = World(config)
    appeal = world.click_chance(np.zeros(World.DIM))
    assert appeal[world.gateway].max() < appeal[~world.gateway].min()
    greedy = online_return(config, lambda history: appeal, users=300)
    gateways_first = online_return(config, lambda history: appeal + 10 * world.gateway, users=300)
    assert gateways_first["return"] - greedy["return"] > 3 * math.hypot(greedy["return_se"], gateways_first["return_se"])
    logged = simulate_logs(config)
    share = np.mean([world.gateway[int(item[1:])] for _, item, _, _ in logged])
    assert share < 0.15


def test_crr_beats_bc_on_the_simulator_end_to_end(tmp_path):
    """Only a learner of long-term value can win here: CRR, from the same pretrained model and for
    the same epochs as BC, reaches a higher online return, by more than three standard errors."""
    data = tmp_path / "sim.parquet"
    r = invoke("rec", "prepare", "--source", "simulator", "--split", "time", "--min-session-length", "2", "--out", data)
    assert r.exit_code == 0, r.output
    model = ["--layers", "1", "--heads", "2", "--width", "32", "--context", "20", "--dropout", "0"]
    # the last epoch: offline validation scores reward copying the logging policy, which is what the
    # simulator shows to be short-sighted, so they would choose an early, BC-like epoch for CRR
    run = ["--epochs", "10", "--batch-size", "64", "--select", "last"]
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *model, *run,
                  "--learning-rate", "0.003").exit_code == 0
    online = {}
    for algo in ("bc", "crr"):
        r = invoke("rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", algo, "--out", tmp_path / algo,
                   *run, "--weight", "binary", "--gamma", "0.9", "--tau", "0.05")
        assert r.exit_code == 0, r.output
        assert invoke("rec", "eval", "--data", data, "--policy", tmp_path / algo, "--out", tmp_path / f"{algo}.json",
                      "--online-users", "300").exit_code == 0
        online[algo] = json.loads((tmp_path / f"{algo}.json").read_text())["online"]
    gap = online["crr"]["return"] - online["bc"]["return"]
    assert gap > 3 * math.hypot(online["crr"]["return_se"], online["bc"]["return_se"]), online
