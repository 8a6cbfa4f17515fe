"""safe_path and id checks: '..', absolute paths and symlinks out of the root are refused."""

from __future__ import annotations

import pytest

from app.security import UnsafePathError, check_hook, check_name, check_run_id, safe_path


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
