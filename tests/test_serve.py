"""serve.py: the endpoints, one-line 400s for bad requests, and a reload under load with no failed request,
against a server started on a free loopback port."""
import http.client
import json
import threading

import pytest

from conftest import train_and_export
from export import export_run
from model_config import Config
from serve import load_phase, serve

pytestmark = pytest.mark.e2e  # the fixture trains and exports a model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    export = tmp / "served"
    cfg = train_and_export(tmp, epochs=1, export_dir=export)
    started = threading.Event()
    box = {}

    def ready(srv, service):
        box.update(server=srv, service=service)
        started.set()

    thread = threading.Thread(target=serve, args=(export, "127.0.0.1", 0, 4096), kwargs={"ready": ready},
                              daemon=True)
    thread.start()
    assert started.wait(120), "the server did not start"
    yield box["server"].server_address[1], box["service"], cfg, export
    box["server"].shutdown()


def call(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_health_and_score(server):
    port, service, cfg, export = server
    status, health = call(port, "GET", "/health")
    assert status == 200 and health["manifest_md5"] == service.scorer.checksum and health["user_tower"] == "onnx"
    assert health["retrieval"] == "exact"  # serve.py --nprobe N: the two-stage path (tests/test_serving.py)
    from threadpoolctl import threadpool_info
    numpy_blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]
    assert health["blas_threads"] >= max(numpy_blas, default=0)  # NumPy's, not another library's single thread
    user_id = int(service.scorer.users["key"][3])
    status, out = call(port, "POST", "/score", {"user_id": user_id, "top_k": 5})
    assert status == 200 and len(out["items"]) == 5 and out["known_user"]
    expected = service.scorer.recommend(user_id, top_k=5)["items"]
    assert [i["item_id"] for i in out["items"]] == [i["item_id"] for i in expected]
    candidates = [int(c) for c in service.scorer.item_ids[:4]]
    status, out = call(port, "POST", "/score", {"user_id": user_id, "candidates": candidates, "top_k": 10})
    assert status == 200 and sorted(i["item_id"] for i in out["items"]) == sorted(candidates)
    status, out = call(port, "POST", "/score", {"user_features": {"gender": "F"}, "top_k": 2})
    assert status == 200 and not out["known_user"] and len(out["items"]) == 2


@pytest.mark.parametrize("body, message", [
    ({"user_id": 1, "colour": "red"}, "unknown field(s) colour"),
    ({"user_id": "1"}, "user_id must be an integer"),
    ({"user_id": True}, "user_id must be an integer"),
    ({"user_id": 1, "top_k": 0}, "top_k must be positive"),
    ({"user_id": 1, "top_k": -3}, "top_k must be positive"),
    ({"user_id": 1, "top_k": 2.5}, "top_k must be an integer"),
    ({"user_id": 1, "candidates": [10**8]}, "not in the index: 100000000"),
    ({"user_id": 1, "candidates": "1,2"}, "candidates must be a list"),
    ({"user_id": 1, "candidates": [1, None]}, "list of item ids (integers)"),
    ({"user_id": 1, "user_features": {"shoe_size": 42}}, "unknown user feature"),
    ({"user_id": 1, "user_features": {"gender": [1]}}, "strings or integers"),
    ({"user_id": 10**30}, "fit in 64 bits"),
    ({}, "give user_id, user_features or both"),
    ([1, 2], "must be a JSON object"),
    (b"{not json", "not valid JSON"),
    (b"x" * 5000, "over the limit of 4,096"),
])
def test_bad_requests_are_400_with_one_line(server, body, message):
    port, *_ = server
    status, out = call(port, "POST", "/score", body)
    assert status == 400 and message in out["error"] and "\n" not in out["error"]


def test_unknown_endpoint_is_404(server):
    port, *_ = server
    assert call(port, "GET", "/score")[0] == 404
    assert call(port, "POST", "/nothing", {})[0] == 404


def test_reload_under_load_fails_no_request(server):
    port, service, cfg, export = server
    old = service.scorer.checksum
    # a different export in the served folder: the same run exported as its last-layer variant
    export_run(Config(run_dir=cfg.run_dir, output_dir=str(export), last_layer_only=True),
               {"run_dir", "output_dir", "last_layer_only"})
    users = [int(u) for u in service.scorer.users["key"][:20]]
    bodies = [json.dumps({"user_id": u, "top_k": 10}).encode() for u in users]
    result = load_phase(port, bodies, clients=4, count=300, time_limit=60, reload_at=100)
    assert result["failed"] == 0 and result["requests"] == 300, result
    assert result["reload"]["reloaded"] and result["reload"]["manifest_md5"] != old
    status, health = call(port, "GET", "/health")
    assert health["manifest_md5"] == result["reload"]["manifest_md5"] and health["reloads"] >= 1
    assert service.scorer.manifest["last_layer_only"]


def test_load_test_command_with_ivf_and_one_blas_thread(server):
    """serve.py --load_test: a bounded run against a server child started with the given options (here the
    two-stage path and one BLAS thread, both reported by the child's /health), no failed request."""
    import subprocess
    import sys
    from conftest import ROOT
    port, service, cfg, export = server
    out = subprocess.run([sys.executable, "serve.py", "--export_dir", str(export), "--load_test", "--requests", "20",
                          "--clients", "1,2", "--time_limit", "30", "--nprobe", "2", "--blas_threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    server = result["server"]  # --blas_threads: the old name of --threads
    assert server["threads"] == server["blas_threads"] == 1 and server["retrieval"].startswith("ivf, nprobe 2 of")
    from scorer import maxsim_kernel
    assert server["maxsim"] == ("numpy" if maxsim_kernel() is None else "kernel")  # the IVF's cells too
    assert [p["clients"] for p in result["phases"]] == [1, 2]
    assert all(p["failed"] == 0 and p["requests"] == 20 for p in result["phases"])
