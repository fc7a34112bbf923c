"""deploy/: every Kubernetes manifest loads into the `kubernetes` package's
models with no field lost (a typo would be dropped silently by the models:
the round trip catches it), and every lcr command line in them parses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers

DEPLOY = helpers.REPO / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
yaml = pytest.importorskip("yaml", reason="PyYAML not installed (comes with kubernetes)")
k8s = pytest.importorskip("kubernetes", reason="the kubernetes package is not installed "
                                                "(pip install -e .[test])")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _model_name(doc: dict) -> str:
    version = doc["apiVersion"].split("/")[-1]
    return f"{version.capitalize()}{doc['kind']}"          # apps/v1 StatefulSet -> V1StatefulSet


def _lost(orig, back, where="") -> list[str]:
    """Paths present in orig that the round trip lost or changed."""
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [where or "/"]
        out = []
        for k, v in orig.items():
            if k not in back:
                out.append(f"{where}/{k}")
            else:
                out += _lost(v, back[k], f"{where}/{k}")
        return out
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [where]
        return [x for i, (a, b) in enumerate(zip(orig, back)) for x in _lost(a, b, f"{where}[{i}]")]
    return [] if str(orig) == str(back) else [f"{where}: {orig!r} became {back!r}"]


def test_there_are_manifests():
    kinds = {d["kind"] for p in MANIFESTS for d in _docs(p)}
    assert {"Job", "StatefulSet", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_deserializes_without_losing_a_field(path):
    api = k8s.client.ApiClient()
    for doc in _docs(path):
        name = _model_name(doc)
        assert hasattr(k8s.client, name), f"{path.name}: no model {name} for {doc['kind']}"
        obj = api._ApiClient__deserialize(doc, name)
        back = api.sanitize_for_serialization(obj)
        lost = _lost(doc, back)
        assert not lost, f"{path.name} ({doc['kind']}): unknown or misspelt fields: {lost}"


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", [])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_lcr_command_lines_parse(path):
    from linuxcr import cli
    for doc in _docs(path):
        for c in _containers(doc):
            args = c.get("args", [])
            assert args and args[0] == "run", f"{path.name}: container {c['name']}: {args}"
            ctx = cli.run.make_context("run", list(args[1:]))
            assert ctx.params["checkpoint_dir"] == "/ckpt"
            grace = ctx.params["grace"]
            from linuxcr.engine.incremental import parse_duration
            tgp = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            # lcr's budget must end before the engine's SIGKILL
            assert parse_duration(grace) < tgp, f"{path.name}: --grace {grace} >= {tgp}s"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/ckpt" in mounts


def test_job_treats_the_saved_exit_code_as_not_done():
    doc = _docs(DEPLOY / "job.yaml")[0]
    args = _containers(doc)[0]["args"]
    from linuxcr import cli
    code = cli.run.make_context("run", list(args[1:])).params["saved_exit_code"]
    assert code != 0
    rules = doc["spec"]["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and code in r.get("onExitCodes", {}).get("values", [])
               for r in rules)
    assert doc["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_seccomp_profile_allows_kcmp_without_capabilities():
    prof = json.loads((DEPLOY / "seccomp-lcr.json").read_text())
    rules = [s for s in prof["syscalls"] if "kcmp" in s["names"]]
    assert rules and all(s["action"] == "SCMP_ACT_ALLOW" and not s.get("includes", {}).get("caps")
                         for s in rules)
    for name in ("ptrace", "process_vm_readv", "pidfd_getfd", "clone3", "unshare"):
        assert any(name in s["names"] and s["action"] == "SCMP_ACT_ALLOW" and not s.get("args")
                   and not s.get("includes", {}).get("caps") for s in prof["syscalls"]), name
