"""Credentials from Prefect Secret blocks reach the store, the jobs and the judge, and appear in no
log, artifact, manifest, parameter or stored file: a tiny run on a real S3 API server whose keys
exist only in Secret blocks, then its evaluation with a judge whose API key does too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid

import boto3
import pytest

from tests.conftest import BIN, FAST, ROOT
from tests.prefect_helpers import api

pytestmark = pytest.mark.slow


def save_secret(prefect_env: dict, name: str, value: str) -> None:
    code = "import sys; from prefect.blocks.system import Secret; Secret(value=sys.argv[2]).save(sys.argv[1], overwrite=True)"
    subprocess.run([sys.executable, "-c", code, name, value], env={**os.environ, **prefect_env}, check=True,
                   capture_output=True, timeout=120)


def everything_prefect_kept(url: str) -> str:
    """Every log line, artifact, flow run (parameters included) and task run on the server."""
    parts = []
    offset = 0
    while batch := api(url, "/logs/filter", {"limit": 200, "offset": offset}):
        parts.append(json.dumps(batch))
        offset += len(batch)
    for path in ("/artifacts/filter", "/flow_runs/filter", "/task_runs/filter"):
        parts.append(json.dumps(api(url, path, {})))
    return "\n".join(parts)


def test_secret_block_credentials_are_used_and_never_written_anywhere(s3_server, prefect_env, judge_url, tmp_path):
    s3_id, s3_key, judge_key = (f"{kind}-{uuid.uuid4().hex}" for kind in ("AKIA", "s3secret", "sk-judge"))
    for name, value in (("s3-id", s3_id), ("s3-key", s3_key), ("judge-key", judge_key)):
        save_secret(prefect_env, name, value)
    bucket = f"cred-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=s3_id, aws_secret_access_key=s3_key,
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/runs"
    logs = tmp_path / "job-logs"
    # the CLI's environment has no credentials at all: only the Secret blocks do
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(prefect_env, S3_ENDPOINT_URL=s3_server, AWS_EC2_METADATA_DISABLED="true", PROLONG_LOG_DIR=str(logs))
    s3_secrets = ["--secret", "AWS_ACCESS_KEY_ID=s3-id", "--secret", "AWS_SECRET_ACCESS_KEY=s3-key"]

    def prolong(*args):
        proc = subprocess.run([str(BIN / "prolong"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.stdout + proc.stderr

    out = prolong("run", "recipes/tiny.yaml", "--store", store, "--run-name", "cred", "--stages", "data,stage1",
                  *[x for o in FAST for x in ("--set", o)], *s3_secrets)
    out += prolong("evaluate", "cred", "--store", store, *s3_secrets, "--secret", "PROLONG_JUDGE_KEY=judge-key",
                   "--set", f"eval.judge.base_url={judge_url}/ok/v1", "--set", "eval.judge.model=judge",
                   "--set", "eval.judge.api_key_env=PROLONG_JUDGE_KEY", "--set", "eval.judge.backoff_s=0",
                   # only what calls the judge, at one length
                   "--set", "eval.helmet.datasets=[narrativeqa,multi_lexsum]", "--set", "eval.lengths=[512]",
                   *[x for k in ("json_kv", "passkey", "needle", "lm_eval", "perplexity") for x in ("--set", f"eval.{k}=null")])

    # they were used: the store is on S3, and the judge was called with the key
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "runs/cred/stage1/manifest.json" in keys and any(k.startswith("runs/cred/evals/") for k in keys)
    with urllib.request.urlopen(f"{judge_url}/requests", timeout=10) as r:
        assert f"Bearer {judge_key}" in json.loads(r.read())["authorization"]

    # and they are nowhere: stored files (manifests, logs, recipe, results), job logs, CLI output, Prefect
    stored = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)
    local_logs = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    kept = everything_prefect_kept(prefect_env["PREFECT_API_URL"])
    for secret in (s3_key, judge_key, s3_id):
        assert secret.encode() not in stored
        assert secret not in local_logs and secret not in out and secret not in kept
