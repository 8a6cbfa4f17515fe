"""The app's gates: safe_path and id checks ('..', absolute paths and symlinks out of the root are refused), the
Host/Origin check of every request and the security headers, and hostile callback values answered with a message
or no update instead of a 500, leaving the cache as it was (the catalogue of single bad values and the message each
gets, CLI and app alike, is ``tests/unit/test_bad_inputs.py``)."""

from __future__ import annotations

import pytest

from app.security import UnsafePathError, check_hook, check_name, check_run_id, safe_path
from tests.browser.dash_payloads import callback_key, job_bodies, post, tree
from tests.browser.dash_payloads import payload as _payload


def payload(app, key, values=None, changed=None) -> dict:
    return _payload(app.callback_map, key, values, changed)


def test_inside_paths_resolve(tmp_path):
    assert safe_path(tmp_path, "runs", "a" * 24) == (tmp_path / "runs" / ("a" * 24)).resolve()
    assert safe_path(tmp_path, "results/demo/m/layer_probes.json").name == "layer_probes.json"
    assert safe_path(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "a/..", "results/../../etc/passwd"])
def test_dotdot_refused(tmp_path, part):
    with pytest.raises(UnsafePathError, match=r"\.\."):
        safe_path(tmp_path, part)


@pytest.mark.parametrize("part", ["/etc/passwd", "/", "~/x", "~root"])
def test_absolute_refused(tmp_path, part):
    with pytest.raises(UnsafePathError, match="absolute"):
        safe_path(tmp_path, part)


@pytest.mark.parametrize("part", ["a\x00b", "a\\..\\b", ""])
def test_odd_characters_refused(tmp_path, part):
    with pytest.raises(UnsafePathError):
        safe_path(tmp_path, part)


def test_symlink_out_of_root_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link.json").symlink_to(outside / "secret.json")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_path(root, "link", "secret.json")
    with pytest.raises(UnsafePathError, match="outside"):
        safe_path(root, "file-link.json")
    (root / "inner").mkdir()
    (root / "ok-link").symlink_to(root / "inner", target_is_directory=True)
    assert safe_path(root, "ok-link") == (root / "inner").resolve()


def test_run_ids_and_names():
    assert check_run_id("0123456789abcdef01234567") == "0123456789abcdef01234567"
    for bad in ["0123456789abcdef0123456", "0123456789ABCDEF01234567", "../0123456789abcdef012345", None, 5,
                "0123456789abcdef01234567/..", "0123456789abcdef0123456g"]:
        with pytest.raises(UnsafePathError):
            check_run_id(bad)
    assert check_name("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    for bad in ["..", ".", ".hidden", "a/b", "", "a b", "x" * 200]:
        with pytest.raises(UnsafePathError):
            check_name(bad)
    assert check_hook("blocks.3.hook_resid_post") and check_hook("features.3")
    for bad in ["../x", "a/b", "blocks..3", "", "a b"]:
        with pytest.raises(UnsafePathError):
            check_hook(bad)


def test_result_files_served_only_json_html_and_the_shared_plotly_bundle(tmp_path):
    from app import create_app
    from probekit.html_page import write_figures_page
    import plotly.graph_objects as go

    folder = tmp_path / "results" / "linearscope" / "digits-cnn"
    folder.mkdir(parents=True)
    write_figures_page(folder / "digit-0.html", [go.Figure(go.Bar(x=["a"], y=[1]))], plotlyjs="directory")
    (folder / "notes.js").write_text("alert(1)")
    (folder / "x.txt").write_text("x")
    client = create_app(tmp_path).server.test_client()
    page = client.get("/files/results/linearscope/digits-cnn/digit-0.html")
    assert page.status_code == 200 and b'src="plotly.min.js"' in page.data
    js = client.get("/files/results/linearscope/digits-cnn/plotly.min.js")  # what the page's relative src asks
    assert js.status_code == 200 and js.mimetype == "text/javascript" and b"plotly.js v" in js.data[:2000]
    for bad in ["linearscope/digits-cnn/notes.js", "linearscope/digits-cnn/x.txt", "../plotly.min.js"]:
        assert client.get(f"/files/results/{bad}").status_code in (404, 308)


def test_result_links_to_other_cache_files_are_refused(tmp_path):
    """A link under results/ may not lend a .json/.html/plotly.min.js name to a shard or manifest elsewhere in the
    cache root: the resolved file must lie in results/ and carry a served suffix itself."""
    from app import create_app, data

    (tmp_path / "runs" / "r1").mkdir(parents=True)
    secret = tmp_path / "runs" / "r1" / "shard-00000.bin"
    secret.write_bytes(b"SECRET-ACTIVATIONS")
    (tmp_path / "runs" / "r1" / "manifest.json").write_text('{"SECRET": 1}')
    res = tmp_path / "results" / "x"
    res.mkdir(parents=True)
    (res / "ok.json").write_text('{"kind": "demo"}')
    (res / "a.json").symlink_to(secret)
    (res / "b.json").symlink_to(tmp_path / "runs" / "r1" / "manifest.json")
    (res / "plotly.min.js").symlink_to(secret)
    client = create_app(tmp_path).server.test_client()
    assert client.get("/files/results/x/ok.json").status_code == 200
    for name in ("a.json", "b.json"):
        r = client.get(f"/files/results/x/{name}")
        assert r.status_code == 404 and b"SECRET" not in r.data
    js = client.get("/files/results/x/plotly.min.js")  # the installed bundle, never the linked file
    assert js.status_code == 200 and b"SECRET" not in js.data and b"plotly.js v" in js.data[:2000]
    assert [f["file"] for f in data.result_files(tmp_path)] == ["ok.json"]


# --------------------------------------------------------------------------------------------- requests
# Every Dash callback is a POST to /_dash-update-component; the payloads below are what the renderer sends.

HOSTILE = [["a", "b"], {"x": 1}, {"nested": [1, {"y": None}]}, "x" * 5000, float("inf"), -1, 10**40, True,
           "../../etc/passwd", 1.5, ""]


def delete_body(app, run_id: str) -> dict:
    return job_bodies(app.callback_map, run_id)["delete"]


FOREIGN = [  # (headers, what the refusal names)
    ({"Host": "attacker.example", "Origin": "http://attacker.example"}, "Host"),  # DNS rebinding
    ({"Host": "attacker.example:8050"}, "Host"),
    ({"Origin": "http://attacker.example"}, "Origin"),  # a cross-site page posting to the loopback port
    ({"Origin": "http://localhost:9999"}, "Origin"),  # another local server is another origin
    ({"Origin": "https://localhost"}, "Origin"),
    ({"Origin": "null"}, "Origin"),  # a sandboxed frame or a file:// page
    ({"Referer": "http://attacker.example/x.html"}, "Referer"),  # no Origin: the Referer must match instead
]


@pytest.mark.parametrize("headers,named", FOREIGN)
@pytest.mark.parametrize("job", ["delete", "capture", "safety"])
def test_cross_origin_state_changes_are_refused(dash_app, client, app_cache, job, headers, named):
    body = job_bodies(dash_app.callback_map, app_cache["run_id"])[job]
    before = tree(app_cache["root"])
    r = post(client, body, **headers)
    assert r.status_code == 403, r.data[:300]
    assert named.encode() in r.data and b"refused" in r.data
    assert tree(app_cache["root"]) == before
    assert (app_cache["root"] / "runs" / app_cache["run_id"]).is_dir()


def test_foreign_host_refused_for_reads_too(client):
    """DNS rebinding would otherwise read the cache: a foreign Host gets nothing, whatever the method."""
    for path in ["/", "/files/results/demo/smollm2-135m/layer_probes.json", "/_dash-layout"]:
        r = client.get(path, headers={"Host": "attacker.example"})
        assert r.status_code == 403 and b"smollm2" not in r.data and b"attacker.example" in r.data
    for host in ["localhost", "127.0.0.1", "[::1]"]:
        assert client.get("/", headers={"Host": host}).status_code == 200


def test_same_origin_delete_still_works(dash_app, client, app_cache):
    from tests.browser.fixture_cache import write_run

    extra = write_run(app_cache["root"], seed=7)
    for headers in ({"Origin": "http://localhost"}, {"Referer": "http://localhost/"}, {}):
        r = post(client, delete_body(dash_app, "f" * 24), **headers)  # no such run: a message, not a refusal
        assert r.status_code == 200 and b"Not deleted" in r.data
    r = post(client, delete_body(dash_app, extra.run_id), Origin="http://localhost", Host="localhost")
    assert r.status_code == 200 and b"Deleted run" in r.data and not extra.path.exists()


def test_allowed_hosts_follow_the_bound_address():
    from app.security import request_refusal

    def refuse(host, *, bind="127.0.0.1", port=8050, method="POST", origin=None, referer=None, extra=()):
        return request_refusal(method=method, host=host, origin=origin, referer=referer, scheme="http",
                               bind_host=bind, port=port, extra_hosts=extra)

    for host in ["127.0.0.1:8050", "localhost:8050", "[::1]:8050", "LOCALHOST:8050"]:
        assert refuse(host) is None and refuse(host, origin=f"http://{host}") is None
    for host in ["127.0.0.1:8051", "127.0.0.1", "attacker.example:8050", "localhost.attacker.example:8050", "",
                 None, "127.0.0.1:8050@x", "a b:8050", "127.0.0.1:8050/x", "[::1:8050"]:
        assert "Host" in refuse(host), host
    assert refuse("127.0.0.1:8050", origin="http://127.0.0.1:8050") is None
    assert "Origin" in refuse("127.0.0.1:8050", origin="http://localhost:8050")  # another name is another origin
    assert refuse("127.0.0.1:8050", method="GET", origin="http://attacker.example") is None  # reads: Host only
    assert "Referer" in refuse("127.0.0.1:8050", referer="http://127.0.0.1:8051/")
    # bound to every interface: any IP-literal Host at that port (a rebinding page always sends a name)
    assert refuse("192.168.1.7:8050", bind="0.0.0.0") is None
    assert "Host" in refuse("attacker.example:8050", bind="0.0.0.0")
    assert refuse("myhost.lan:8050", bind="0.0.0.0", extra=("myhost.lan",)) is None
    assert refuse("10.0.0.2:8050", bind="10.0.0.2") is None and "Host" in refuse("10.0.0.3:8050", bind="10.0.0.2")


def test_security_headers_on_every_response(client, dash_app, app_cache):
    import hashlib
    import re
    import base64

    responses = [client.get("/"), client.get("/files/results/demo/smollm2-135m/layer_probes.json"),
                 client.get("/files/results/nope.json"), client.get("/", headers={"Host": "attacker.example"}),
                 post(client, delete_body(dash_app, "f" * 24))]
    for r in responses:
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    csp = responses[0].headers["Content-Security-Policy"]
    directives = dict((d.split()[0], d.split()[1:]) for d in csp.split(";") if d.strip())
    assert directives["default-src"] == ["'self'"] and directives["object-src"] == ["'none'"]
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in directives["script-src"]
    # every inline script Dash writes into the index page is allowed by its hash, and nothing else inline
    page = re.sub(r"<!--.*?-->", "", responses[0].data.decode(), flags=re.S)  # the IE-only comment never runs
    inline = [s for a, s in re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
              if "src=" not in a and "application/json" not in a]
    hashes = {"'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'" for s in inline}
    assert hashes and hashes <= set(directives["script-src"])


def test_result_pages_are_sandboxed(client, app_cache):
    """A result page (its own inline plotly scripts) runs in a sandbox: an opaque origin that cannot call the app."""
    r = client.get("/files/results/demo/smollm2-135m/layer_probes.html")
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "sandbox allow-scripts" in csp and "allow-same-origin" not in csp and "frame-ancestors 'none'" in csp


# --------------------------------------------------------------------------------------------- hostile values
# The app's rows of the bad-input catalogue (one value, one expected message) are in test_bad_inputs.py; here every
# callback gets every hostile value.


def test_no_callback_fails_on_hostile_values(dash_app, client, app_cache):
    """Every callback (background jobs aside: they validate through build_spec / prompt_spec, tested below) with
    each hostile value in each input: a 200 or a 204 (no update), never a 500 from the page code."""
    before = tree(app_cache["root"])
    failures = []
    for key, cb in list(dash_app.callback_map.items()):
        if cb.get("background") or "MATCH" in key or "ALL" in str(cb["inputs"]):
            continue
        for d in cb["inputs"] + cb["state"]:
            for bad in HOSTILE:
                r = post(client, payload(dash_app, key, {f"{d['id']}.{d['property']}": bad}))
                if r.status_code not in (200, 204):
                    failures.append((key[:60], d["id"], repr(bad)[:30], r.status_code))
    assert failures == [], "\n".join(map(str, failures))
    assert tree(app_cache["root"]) == before


def test_hook_picker_still_adds_the_picked_hook(dash_app, client):
    """The picker's checks refuse hostile values only: a picked hook name is appended once, the picker cleared."""
    import json

    key = callback_key(dash_app.callback_map, "capture-hook-pick.value..")
    for have, want in [("blocks.0.hook_resid_post", "blocks.0.hook_resid_post blocks.1.hook_mlp_out"),
                       ("blocks.1.hook_mlp_out,", "blocks.1.hook_mlp_out"), (None, "blocks.1.hook_mlp_out")]:
        r = post(client, payload(dash_app, key, {"capture-hook-pick.value": "blocks.1.hook_mlp_out",
                                                 "capture-hooks.value": have}))
        assert r.status_code == 200
        answer = json.loads(r.data)["response"]
        assert answer == {"capture-hooks": {"value": want}, "capture-hook-pick": {"value": None}}


@pytest.mark.parametrize("bad", HOSTILE)
def test_pattern_callbacks_refuse_hostile_ids(dash_app, client, app_cache, bad):
    import json

    before = tree(app_cache["root"])
    ask = payload(dash_app, callback_key(dash_app.callback_map, "home-confirm.displayed"))
    ask["inputs"] = [[{"id": {"type": "delete-run", "run": bad}, "property": "n_clicks", "value": 1}]]
    ask["changedPropIds"] = [json.dumps({"run": bad, "type": "delete-run"}, sort_keys=True) + ".n_clicks"]
    r = post(client, ask)
    assert r.status_code in (200, 204) and b"Delete run" not in r.data
    verify_key = callback_key(dash_app.callback_map, "verify-result")
    body = {"output": verify_key, "outputs": {"id": {"type": "verify-result", "run": bad}, "property": "children"},
            "inputs": [{"id": {"type": "verify-run", "run": bad}, "property": "n_clicks", "value": 1}], "state": [],
            "changedPropIds": [json.dumps({"run": bad, "type": "verify-run"}, sort_keys=True) + ".n_clicks"]}
    r = post(client, body)
    assert r.status_code in (200, 204), r.data[-300:]
    assert tree(app_cache["root"]) == before


@pytest.mark.parametrize("bad", [dict(max_length=[8]), dict(max_length=float("inf")), dict(max_length="x"),
                                 dict(batch_size={"a": 1}), dict(batch_size=float("nan")), dict(n_functions=[3]),
                                 dict(n_functions=float("inf")), dict(n_functions=2.5), dict(n_functions=True),
                                 dict(positions=["all"]), dict(dtype={"float32": 1}), dict(hooks=["a"]),
                                 dict(hooks={"a": 1}), dict(texts=[1], dataset="texts"), dict(model=["x"]),
                                 dict(model={"x": 1}), dict(model=5), dict(dataset=["stdlib"])])
def test_capture_spec_refuses_non_string_values(app_cache, bad):
    from app.jobs import build_spec

    args = dict(model="models/tiny-llama", hooks="blocks.0.hook_resid_post", dataset="stdlib", n_functions=5,
                texts=None) | bad
    with pytest.raises(ValueError):
        build_spec(app_cache["root"], **args)


@pytest.mark.parametrize("bad", [dict(prompt=["hi"]), dict(prompt={"a": 1}), dict(layer=[0]), dict(layer=float("inf")),
                                 dict(layer=True), dict(layer=0.5), dict(result_id=["tiny-llama"]),
                                 dict(result_id={"a": 1})])
def test_safety_prompt_spec_refuses_non_string_values(app_cache, bad):
    from app import data
    from app.pages import safety

    data.set_root(app_cache["root"])
    args = dict(result_id="tiny-llama", prompt="hi", layer=0) | bad
    with pytest.raises(ValueError):
        safety.prompt_spec(**args)
    assert safety.prompt_spec("tiny-llama", "hi", 0).layer == 0


@pytest.mark.parametrize("rel", ["a" * 300 + ".json", "x/" + "b" * 5000 + ".html", ("c" * 250 + "/") * 20 + "d.json"])
def test_over_long_result_names_are_refused_cleanly(client, app_cache, rel):
    before = tree(app_cache["root"])
    r = client.get(f"/files/results/{rel}")
    assert r.status_code in (404, 400) and b"Traceback" not in r.data
    assert tree(app_cache["root"]) == before


@pytest.mark.parametrize("body,named", [
    ({"output": "nope"}, "no callback"), ([], "JSON object"), ("x", "JSON object"), ({"output": ["a"]}, "no callback"),
    ({"output": "page.children", "inputs": 5}, "inputs"), ({"output": "page.children"}, "inputs"),
    ({"output": "page.children", "inputs": [{"id": "url"}], "state": [{"id": "url", "property": "search"}]},
     "inputs"),
    ({"output": "page.children", "inputs": [{"id": "url", "property": "pathname"}], "state": [5]}, "state"),
    ({"output": "page.children", "inputs": [{"id": "url", "property": "pathname"}],
      "state": [{"id": "url", "property": "search"}], "changedPropIds": [{"a": 1}]}, "changedPropIds"),
    ({"output": "page.children", "outputs": 5, "inputs": [{"id": "url", "property": "pathname"}],
      "state": [{"id": "url", "property": "search"}]}, "outputs"),
])
def test_malformed_callback_requests_get_a_400(client, app_cache, body, named):
    """A body the renderer never sends is refused before Dash reads it (Dash itself fails on it with a 500)."""
    import json

    before = tree(app_cache["root"])
    r = client.post("/_dash-update-component", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400 and named in r.data.decode()
    assert tree(app_cache["root"]) == before


def test_allow_host_flag_reaches_the_request_gate(tmp_path, monkeypatch, capsys):
    """`probekit app --allow-host NAME`: requests naming NAME are served, others still refused; a value that is
    not a host name is refused before the app starts."""
    import app as app_pkg
    from probekit.cli import main

    served = {}

    def fake_run(self, host, port, debug):  # capture the app instead of serving it
        served.update(app=self, host=host, port=port)

    monkeypatch.setattr("dash.Dash.run", fake_run)
    assert main(["app", "--cache-root", str(tmp_path), "--allow-host", "probe.lab.example", "--reports",
                 str(tmp_path)]) == 0
    client = served["app"].server.test_client()
    assert client.get("/", headers={"Host": "probe.lab.example"}).status_code == 200
    assert client.get("/", headers={"Host": "other.example"}).status_code == 403
    refused = served["app"].server.test_client().get("/", headers={"Host": "other.example"}).data
    assert b"--allow-host" in refused  # the refusal names the flag that admits a name
    for bad in ["http://x.example", "x.example:8050", "x.example/path", "a b", ""]:
        with pytest.raises(SystemExit, match="--allow-host"):
            main(["app", "--cache-root", str(tmp_path), "--allow-host", bad])
    assert app_pkg.create_app is not None
