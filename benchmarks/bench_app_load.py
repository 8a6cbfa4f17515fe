"""Load test of the Dash app on loopback: 500 requests from 8 concurrent clients against page and callback
routes, against a baseline of the same count of static-file requests served by the same Flask server.

The app runs as ``probekit app`` in a subprocess over a temporary cache root filled with result files in
the probes' formats (tests/browser/fixture_cache.py). Writes benchmarks/out/app_load.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
N_REQUESTS, CLIENTS = 500, 8


def _callback(outputs: list[tuple[str, str]], inputs: list[tuple[str, str, object]], state=()) -> dict:
    out = "...".join(f"{i}.{p}" for i, p in outputs)  # Dash names a single output "id.prop", several "..a...b.."
    one = len(outputs) == 1
    return dict(output=out if one else f"..{out}..",
                outputs=dict(id=outputs[0][0], property=outputs[0][1]) if one else
                [dict(id=i, property=p) for i, p in outputs],
                inputs=[dict(id=i, property=p, value=v) for i, p, v in inputs],
                changedPropIds=[f"{inputs[0][0]}.{inputs[0][1]}"],
                state=[dict(id=i, property=p, value=v) for i, p, v in state])


APP_REQUESTS = [
    ("GET", "/", None),
    ("GET", "/_dash-layout", None),
    ("GET", "/files/results/demo/smollm2-135m/layer_probes.json", None),
    ("POST", "/_dash-update-component", _callback([("layers-acc-fig", "figure"), ("layers-acc-msg", "children")],
                                                  [("layers-model", "value", "smollm2-135m"),
                                                   ("layers-show", "value", ["controls"])])),
    ("POST", "/_dash-update-component", _callback([("ast-layer-fig", "figure"), ("ast-layer-msg", "children")],
                                                  [("ast-model", "value", "smollm2-135m"),
                                                   ("ast-metric", "value", "f1"), ("ast-controls", "value", ["on"])])),
    ("POST", "/_dash-update-component", _callback([("ast-tree-fig", "figure"), ("ast-tree-msg", "children")],
                                                  [("ast-model", "value", "smollm2-135m"),
                                                   ("ast-snippet", "value", 1), ("ast-layer", "value", "5")])),
    ("POST", "/_dash-update-component", _callback([("page", "children")], [("url", "pathname", "/ast-probe")],
                                                  [("url", "search", "?model=smollm2-135m&snippet=1")])),
]
BASELINE = [("GET", "/assets/style.css", None)]


def view_requests(run_id: str, hook: str, d_sae: int) -> list:
    """Latent pages (several latents), the latent list and a token search, and token views of cached documents
    coloured by ‖x‖ and by an SAE latent (tests/browser/fixture_cache.write_views)."""
    lat_out = [(i, "children") for i in ("lat-head", "lat-top-wrap", "lat-quant-wrap", "lat-logits-wrap",
                                          "lat-neigh-wrap")]
    reqs = [("POST", "/_dash-update-component", _callback([("lat-hist-fig", "figure"), *lat_out],
                                                          [("lat-result", "value", "view-sae"),
                                                           ("lat-latent", "value", i)])) for i in range(0, d_sae, 3)]
    reqs.append(("POST", "/_dash-update-component", _callback([("lat-list", "children")],
                                                              [("lat-result", "value", "view-sae"),
                                                               ("lat-sort", "value", "rate"),
                                                               ("lat-search", "value", "")])))
    reqs.append(("POST", "/_dash-update-component", _callback([("lat-list", "children")],
                                                              [("lat-result", "value", "view-sae"),
                                                               ("lat-sort", "value", "rate"),
                                                               ("lat-search", "value", "d")])))
    tok_in = ["tok-source", "tok-run", "tok-doc", "tok-fid", "tok-hook", "tok-qty", "tok-neuron", "tok-vector",
              "tok-sae", "tok-latent", "tok-sinks"]
    for doc in range(3):
        for qty, latent in (("norm", None), ("latent", 2)):
            vals = ["cached", run_id, doc, None, hook, qty, 0, None, "saes/view-sae" if latent is not None else None,
                    latent, ["on"]]
            props = ["data" if i == "tok-fid" else "value" for i in tok_in]
            reqs.append(("POST", "/_dash-update-component",
                         _callback([("tok-view", "children")], list(zip(tok_in, props, vals)))))
    reqs.append(("POST", "/_dash-update-component", _callback([("page", "children")], [("url", "pathname", "/latents")],
                                                              [("url", "search", "?result=view-sae&latent=4")])))
    return reqs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hammer(base: str, reqs: list, n: int) -> dict:
    local = threading.local()
    lat, errors = np.zeros(n), []

    def one(i: int) -> None:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        method, path, body = reqs[i % len(reqs)]
        t = time.perf_counter()
        try:
            r = s.request(method, base + path, json=body, timeout=30)
            if r.status_code != 200:
                errors.append(f"{path}: {r.status_code}")
        except requests.RequestException as e:
            errors.append(f"{path}: {e}")
        lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as ex:
        list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    ms = lat * 1000
    return dict(requests=n, clients=CLIENTS, errors=len(errors), error_samples=errors[:5],
                p50_ms=round(float(np.percentile(ms, 50)), 1), p95_ms=round(float(np.percentile(ms, 95)), 1),
                max_ms=round(float(ms.max()), 1), throughput_rps=round(n / wall, 1))


def main() -> int:
    from tests.browser.fixture_cache import populate, write_views

    root = Path(tempfile.mkdtemp(prefix="probekit-app-bench-"))
    populate(root)
    vinfo = write_views(root)
    views_reqs = view_requests(vinfo["view_run_id"], vinfo["view_hook"], 24)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "probekit", "app", "--port", str(port), "--cache-root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(base + "/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.3)
        for method, path, body in APP_REQUESTS + views_reqs:  # warm: parse the files once ("computed results")
            requests.request(method, base + path, json=body, timeout=60).raise_for_status()
        baseline = _hammer(base, BASELINE, N_REQUESTS)
        app = _hammer(base, APP_REQUESTS, N_REQUESTS)
        views = _hammer(base, views_reqs, N_REQUESTS)
    finally:
        proc.terminate()
        proc.wait(10)
    ratio = app["p95_ms"] / max(baseline["p95_ms"], 1e-9)
    out = dict(app=app, views=views, baseline_static_file=baseline, p95_ratio_app_over_static=round(ratio, 2),
               p95_ratio_views_over_static=round(views["p95_ms"] / max(baseline["p95_ms"], 1e-9), 2),
               goal_p95_ms=300, cpu_count=os.cpu_count(),
               routes=[f"{m} {p}" + (f" ({b['output']})" if b else "") for m, p, b in APP_REQUESTS])
    Path(REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "app_load.json").write_text(json.dumps(out, indent=2))
    print(f"static file (baseline): p50 {baseline['p50_ms']} ms, p95 {baseline['p95_ms']} ms, "
          f"{baseline['throughput_rps']} req/s, {baseline['errors']} errors")
    print(f"app pages + callbacks : p50 {app['p50_ms']} ms, p95 {app['p95_ms']} ms, "
          f"{app['throughput_rps']} req/s, {app['errors']} errors")
    print(f"latent pages + token views: p50 {views['p50_ms']} ms, p95 {views['p95_ms']} ms, "
          f"{views['throughput_rps']} req/s, {views['errors']} errors")
    print(f"p95 ratio app / static file: {ratio:.2f}× (goal: app p95 < 300 ms); views / static file: "
          f"{out['p95_ratio_views_over_static']:.2f}×")
    return 1 if app["errors"] or baseline["errors"] or views["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
