"""pipelines/paper.toml, the paper's experiments as data, agrees with Table 1 and the test-scale rule."""

import pathlib
import tomllib

import pytest

import vgg_keras
from vgg_keras.data import parse_scale
from vgg_keras import evaluate

PAPER = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "paper.toml").read_text())


def test_every_run_is_a_valid_recipe():
    for name, run in PAPER["runs"].items():
        assert run["config"] in vgg_keras.CONFIG_NAMES, name
        smin, smax = parse_scale(run["scale"])
        assert 256 <= smin <= smax <= 512, name
        for parent_key in ("init_from", "finetune_from"):
            if parent_key in run:
                parent = PAPER["runs"][run[parent_key]]
                if parent_key == "init_from":  # the paper pre-initialises from A
                    assert parent["config"] == "A", name
                else:  # fine-tuning keeps the configuration
                    assert parent["config"] == run["config"], name


@pytest.mark.parametrize("table", ["table3", "table4", "table5", "table6"])
def test_every_row_names_known_runs_and_methods(table):
    for row in PAPER[table]:
        assert all(run in PAPER["runs"] for run in row["runs"]), row
        evaluate.check_method(row["method"])
        top1, top5 = row["error"]
        assert 0 < top5 < top1 < 100


def test_table_4_scales_follow_the_papers_rule():
    for row in PAPER["table4"] + PAPER["table5"] + PAPER["table6"]:
        for run in row["runs"]:
            assert list(evaluate.test_scales(parse_scale(PAPER["runs"][run]["scale"]))) == row["scales"], row
