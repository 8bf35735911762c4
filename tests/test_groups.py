"""Repeated layers as one row: grouping rows that differ only by the numbers in their names."""

from __future__ import annotations

import pytest

from qlower.groups import compact_numbers, group_rows


def linear(name: str, n: int = 64, k: int = 64, **fields) -> dict:
    return {"name": name, "kind": "linear", "n": n, "k": k, "group_size": 32, "fused_op": "linear_dq8ca_q4gsw", **fields}


@pytest.mark.parametrize("numbers, text", [
    ([0, 1, 2, 3], "0..3"),
    ([0, 1, 2, 3, 5, 6, 7], "0..3,5..7"),
    ([7, 3, 5, 1], "1,3,5,7"),
    ([4, 5], "4,5"),  # runs shorter than three are listed
    ([2, 2, 9], "2,9"),
    ([30], "30"),
])
def test_compact_numbers(numbers, text):
    assert compact_numbers(numbers) == text


def test_layers_differing_only_by_index_share_a_group():
    rows = [linear(f"model.layers.{i}.mlp.{p}", n=n) for i in range(16) for p, n in (("up_proj", 128), ("down_proj", 64))]
    groups = group_rows(rows)
    assert [(g["name"], g["count"], g["n"]) for g in groups] == [
        ("model.layers.{0..15}.mlp.up_proj", 16, 128), ("model.layers.{0..15}.mlp.down_proj", 16, 64)]
    assert groups[0]["rows"] == list(range(0, 32, 2))  # positions in the per-layer list
    assert all("count" not in r and "rows" not in r for r in rows)  # the rows are left as they were
    assert all(rows[i]["name"] == f"model.layers.{i // 2}.mlp.up_proj" for i in groups[0]["rows"])


def test_a_different_field_keeps_its_layer_apart():
    rows = [linear(f"layers.{i}.fc") for i in range(8)]
    rows[4] = linear("layers.4.fc", fused_op=None, reason="skipped by a per-layer override")
    rows[6] = linear("layers.6.fc", group_size=64)
    rows.append(linear("lm_head", n=256))
    groups = group_rows(rows)
    assert [(g["name"], g["count"]) for g in groups] == [
        ("layers.{0..3,5,7}.fc", 6), ("layers.4.fc", 1), ("layers.6.fc", 1), ("lm_head", 1)]
    assert groups[1]["reason"] == "skipped by a per-layer override" and groups[2]["group_size"] == 64
    assert sum(g["count"] for g in groups) == len(rows)


def test_fields_added_later_take_part():
    """A field the grouping does not know (say an algorithm) still separates rows."""
    rows = [linear(f"h.{i}.attn", algorithm="rtn") for i in range(5)]
    rows[2]["algorithm"] = "gptq"
    groups = group_rows(rows)
    assert [(g["name"], g["algorithm"]) for g in groups] == [("h.{0,1,3,4}.attn", "rtn"), ("h.2.attn", "gptq")]


def test_several_numbers_in_a_name():
    # A full product of block and expert numbers is one group.
    full = [linear(f"blocks.{b}.experts.{e}.w1") for b in range(3) for e in range(4)]
    assert [(g["name"], g["count"]) for g in group_rows(full)] == [("blocks.{0..2}.experts.{0..3}.w1", 12)]
    # Not a product: each group varies in one number and names exactly its members.
    partial = [linear(f"blocks.{b}.experts.{e}.w1") for b, e in ((0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2))]
    groups = group_rows(partial)
    named = {g["name"]: g["count"] for g in groups}
    assert named == {"blocks.{0..2}.experts.0.w1": 3, "blocks.{0,2}.experts.1.w1": 2, "blocks.2.experts.2.w1": 1}
    assert sorted(i for g in groups for i in g["rows"]) == list(range(len(partial)))


def test_names_without_canonical_numbers_stay_apart():
    rows = [linear("enc.01.fc"), linear("enc.02.fc"), linear("fc1"), linear("fc2"), linear("x.3"), linear("x.3")]
    groups = group_rows(rows)
    assert [(g["name"], g["count"]) for g in groups] == [("enc.01.fc", 1), ("enc.02.fc", 1), ("fc1", 1), ("fc2", 1), ("x.3", 2)]


def test_grouping_without_names_and_with_ignored_fields():
    rows = [{"op": "linear_q4gsw", "node_id": i * 7, "n": 32 if i != 3 else 48} for i in range(5)]
    groups = group_rows(rows, name_key=None, ignore=("node_id",))
    assert [(g["count"], g["n"], g["rows"]) for g in groups] == [(4, 32, [0, 1, 2, 4]), (1, 48, [3])]
    assert all("name" not in g and "node_id" not in g for g in groups)
