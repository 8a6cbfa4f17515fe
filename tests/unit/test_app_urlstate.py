"""URL query state: parsed against a schema, hostile values dropped, round trip."""

from __future__ import annotations

from app.pages import ast_probe, layers
from app.urlstate import encode_query, parse_query


def test_parse_keeps_known_valid_keys():
    q = parse_query("?model=smollm2-135m&layer=17&snippet=3&evil=1", {"model": str, "layer": str, "snippet": int})
    assert q == {"model": "smollm2-135m", "layer": "17", "snippet": 3}


def test_parse_drops_bad_values():
    schema = {"snippet": int, "controls": bool, "show": list}
    assert parse_query("snippet=__import__('os')&controls=maybe", schema) == {}
    assert parse_query("snippet=" + "9" * 400, schema) == {}
    assert parse_query("controls=0&show=train,controls", schema) == {"controls": False, "show": ["train", "controls"]}
    assert parse_query(None, schema) == {} and parse_query("", schema) == {}


def test_round_trip_of_page_schemas():
    state = dict(model="smollm2-135m", metric="f1", controls=False, curves="both", layer="17", snippet=3)
    assert parse_query(encode_query(state), ast_probe.SCHEMA) == state
    state = dict(model="m", show=["train"], run="0" * 24, stat="mean_norm", hook="blocks.1.hook_resid_post", doc=2)
    assert parse_query(encode_query(state), layers.SCHEMA) == state
    assert encode_query({"a": None, "b": "", "c": []}) == ""
