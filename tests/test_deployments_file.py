"""prefect.yaml points at real flows and bakes in no absolute path."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow), deployment["name"]
        assert deployment["work_pool"]["name"] == "adit"


def test_pull_step_sets_working_directory_without_absolute_paths() -> None:
    text = (ROOT / "prefect.yaml").read_text()
    config = yaml.safe_load(text)
    steps = [next(iter(step)) for step in config["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"]
    assert str(ROOT) not in text


def test_every_flow_of_the_product_has_a_deployment() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"].split(":")[1] for d in config["deployments"]}
    assert entrypoints == {"selective_transfer_flow", "transfer_flow", "query_flow",
                           "batch_query_flow", "batch_transfer_flow",
                           "continuous_transfer_flow"}
