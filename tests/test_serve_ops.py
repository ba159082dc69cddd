"""The served endpoint under load (benchmarks/serve_load.py's scenarios, small): Serve's autoscaling takes the app of
infra/serve.yaml from 1 to 2 replicas and back, a replica killed with SIGKILL fails no client request (clients retry
as the openai client does; only requests running on the killed replica need it), and moving the `champion` alias
then redeploying switches the served version with no failed request and no pause. Real Ray Serve, real HTTP on
loopback, a real sqlite MLflow registry; a few clients for a few seconds each."""

from __future__ import annotations

import pytest
from ray import serve

from benchmarks.serve_load import (APP, REGISTERED, alias_move, autoscaling, failover, free_port, registry,
                                   start_serve, tiny_checkpoints)

CLIENTS, HOLD_S = 3, 1


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ops")
    checkpoints = tiny_checkpoints(root)
    args = {"model_uri": str(checkpoints[0]), "cache_dir": str(root / "cache"), "model_name": "llama2-chat",
            "default_max_tokens": 16}
    port = free_port()
    start_serve(port)  # one Serve instance for the module: the scenarios' apps replace each other
    yield root, checkpoints, args, port
    serve.shutdown()


@pytest.fixture(autouse=True)
def app_deleted():
    yield
    serve.delete(APP)


def test_autoscaling_goes_from_1_to_2_replicas_under_load_and_back(setup):
    _, _, args, port = setup
    result = autoscaling(port, args, CLIENTS, HOLD_S)
    assert result["timeline"][0][1] == 1, result
    assert result["max_replicas"] == 2 and result["final_replicas"] == 1, result
    assert result["ok"] > 0 and result["failed"] == 0 and result["failed_tries"] == 0, result


def test_a_replica_killed_under_load_fails_no_client_request(setup):
    _, _, args, port = setup
    result = failover(port, args, CLIENTS, HOLD_S)
    assert result["replicas_before"] == 2 and result["new_pids"] and result["final_replicas"] == 2, result
    assert result["replaced_s"] is not None, result
    assert result["ok"] > 0 and result["failed"] == 0, result
    # Only the requests running on the killed replica fail once (Serve does not retry an accepted request): at most
    # one per client, each a 5xx or a dropped connection that the client's retry then served.
    assert result["failed_tries"] <= CLIENTS, result
    assert all(e.startswith("HTTP 5") or not e.startswith("HTTP") for e in result["errors"]), result


def test_moving_the_champion_alias_and_redeploying_switches_the_version_with_no_failed_request(setup):
    root, checkpoints, args, port = setup
    result = alias_move(port, args, registry(root, checkpoints), CLIENTS, HOLD_S)
    assert result["root_before"] == f"models:/{REGISTERED}/1" and result["root_after"] == f"models:/{REGISTERED}/2"
    assert result["texts_differ"] and result["unknown_texts"] == 0, result
    assert result["by_version"][1] > 0 and result["by_version"][2] > 0, result
    assert result["ok"] > 0 and result["failed"] == 0 and result["failed_tries"] == 0, result
    # The new replica starts before the old one stops (max_surge_percent): the hand-over overlaps briefly, and no
    # request waits for a replica to load (without the surge, one replica paused every client ~15 s here).
    assert result["last_v1_s"] <= result["first_v2_s"] + 3, result
    assert result["stall_s"] < 8, result
