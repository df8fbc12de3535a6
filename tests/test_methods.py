"""Methods of a comparison: labels, results-folder budgets and curves, keep biases, matched sources."""

import pytest
import torch

from namm_transfer.evals.report import run_name
from namm_transfer.methods import MATCHED, Method, bias_tag, build_policy, comparison
from namm_transfer.namm.checkpoint import NammWeights
from namm_transfer.namm.config import NammConfig


def test_labels_folders_and_curves_of_biased_methods():
    methods = comparison(["full", "namm", "h2o"], (0.5,), with_namm=True, keep_biases=(0.0, -0.5, 1.0))
    assert [m.label for m in methods] == [
        "full", "namm", "namm@-0.5", "namm@+1", "h2o@matched", "h2o@matched-0.5", "h2o@matched+1", "h2o@0.5"]
    assert [m.curve for m in methods] == ["full"] + ["namm"] * 3 + ["h2o@matched"] * 3 + ["h2o@ratio"]
    assert [m.namm_source for m in methods[4:7]] == methods[1:4]
    assert methods[0].namm_source is None and methods[1].namm_source is None
    # bias 0 keeps the folder names results were written under before keep biases existed
    assert run_name("d", "m", "namm", Method("namm").run_budget) == "d__m__namm__full"
    assert run_name("d", "m", "h2o", Method("h2o", MATCHED).run_budget) == "d__m__h2o__matched"
    names = {run_name("d", "m", m.rule, m.run_budget) for m in comparison(
        ["namm", "h2o"], (), True, (0.5, -0.5, 1e6, 1e-6, -1e-6))}
    assert len(names) == 10  # signs and exponents never collide after sanitising
    assert Method("namm", keep_bias=-0.0).label == "namm" and bias_tag(0.125) == "+0.125"


def test_bad_keep_biases_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        comparison(["namm"], (), True, (0.5, 0.5))
    with pytest.raises(ValueError, match="distinct"):
        comparison(["namm"], (), True, (0.1234567, 0.1234568))  # same label
    with pytest.raises(ValueError, match="distinct"):
        comparison(["namm"], (), True, ())
    with pytest.raises(ValueError, match="finite"):
        Method("namm", keep_bias=float("nan"))
    with pytest.raises(ValueError, match="only 'namm' and matched"):
        Method("h2o", 0.5, keep_bias=1.0)


def test_build_policy_passes_the_keep_bias():
    config = NammConfig()
    weights = NammWeights(params=torch.zeros(config.num_params), norm_mean=torch.zeros(17), norm_var=torch.ones(17),
                          config=config, provenance={})
    assert build_policy(Method("namm", keep_bias=-2.5), weights).keep_bias == -2.5
    assert build_policy(Method("namm"), weights).keep_bias == 0.0
