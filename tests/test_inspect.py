"""optckpt.inspect on checkpoints of real torch optimizers, against sums computed here.

Every expected number comes from the torch state dict itself (``numel``, ``element_size``,
``torch.linalg.vector_norm``, ``torch.isfinite``), never from an earlier report.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import tensors_of
from torch import nn

import optckpt.inspect as inspect_module
from optckpt.errors import UsageError
from optckpt.inspect import inspect_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# --------------------------------------------------------------------------- building checkpoints


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            x = torch.randn(5, 4, generator=generator, dtype=next(model.parameters()).dtype)
            loss = model(x).float().square().mean()
            loss.backward()
            return loss

        optimizer.step(closure)


def _named_two_groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]


def _case_adamw_named() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    return model, torch.optim.AdamW(_named_two_groups(model), lr=1e-2)


def _case_sgd_momentum() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _case_rmsprop_centered() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    return model, torch.optim.RMSprop(model.parameters(), momentum=0.5, centered=True)


def _case_adam_amsgrad_bf16() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    model[2].to(torch.bfloat16)  # mixed dtypes: two bf16 params among f32 ones
    model[2].register_forward_pre_hook(lambda _, args: (args[0].to(torch.bfloat16),))
    return model, torch.optim.Adam(model.parameters(), amsgrad=True)


def _case_lbfgs() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()  # its state holds lists of tensors and plain numbers
    return model, torch.optim.LBFGS(model.parameters(), history_size=4, max_iter=5)


def _simple(cls: type[torch.optim.Optimizer], **kwargs: Any) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = _model()
        return model, cls(model.named_parameters(), **kwargs)

    return build


CASES: dict[str, Callable[[], tuple[nn.Module, torch.optim.Optimizer]]] = {
    "AdamW": _case_adamw_named,
    "SGD": _case_sgd_momentum,
    "RMSprop": _case_rmsprop_centered,
    "Adam": _case_adam_amsgrad_bf16,
    "LBFGS": _case_lbfgs,
    "Adagrad": _simple(torch.optim.Adagrad),
    "Adadelta": _simple(torch.optim.Adadelta),
    "Adamax": _simple(torch.optim.Adamax),
    "ASGD": _simple(torch.optim.ASGD),
    "NAdam": _simple(torch.optim.NAdam),
    "RAdam": _simple(torch.optim.RAdam),
    "Rprop": _simple(torch.optim.Rprop),
    "Adafactor": _simple(torch.optim.Adafactor),
}


def _saved(tmp_path: Path, obj: Any, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _trained(case: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optimizer = CASES[case]()
    _train(model, optimizer)
    return model, optimizer


# --------------------------------------------------------------------------- independent truth


def _expected_totals(sd: Mapping[str, Any]) -> dict[str, int]:
    ids = list(dict.fromkeys(i for g in sd["param_groups"] for i in g["params"]))
    tensors = list(tensors_of(sd["state"]))
    return {
        "params": len(ids),
        "params_with_state": sum(1 for i in ids if sd["state"].get(i)),
        "numel": sum(t.numel() for t in tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


def _expected_by_dtype(sd: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"numel": 0, "bytes": 0})
    for t in tensors_of(sd["state"]):
        name = str(t.dtype).removeprefix("torch.")
        out[name]["numel"] += t.numel()
        out[name]["bytes"] += t.numel() * t.element_size()
    return dict(out)


def _finite_truth(t: torch.Tensor) -> dict[str, Any]:
    values = t.detach().to(torch.complex128).abs() if t.is_complex() else t.detach().double()
    finite = values[torch.isfinite(values)]
    n = max(finite.numel(), 1)
    return {
        "norm": torch.linalg.vector_norm(finite).item(),
        "min": finite.min().item() if finite.numel() else None,
        "max": finite.max().item() if finite.numel() else None,
        "nonfinite": int((~torch.isfinite(values)).sum()),
        "rms": math.sqrt(finite.square().sum().item() / n),
        "mean": finite.sum().item() / n,
    }


def _assert_stats(stats: Any, t: torch.Tensor) -> None:
    truth = _finite_truth(t)
    assert stats.nonfinite == truth["nonfinite"]
    if t.is_complex():  # magnitudes may be taken in the tensor's own precision
        close = {"rel_tol": 1e-6}
    else:  # min/max are exact; sums differ from ours only in the order of float64 additions
        assert stats.min == truth["min"] and stats.max == truth["max"]
        close = {"rel_tol": 1e-12}
    for key in ("norm", "rms", "mean", "min", "max"):
        if truth[key] is None:
            assert getattr(stats, key) is None
        else:
            assert math.isclose(getattr(stats, key), truth[key], **close), key


# --------------------------------------------------------------------------- the JSON schema


def _check_state_value(value: Any) -> None:
    if isinstance(value, dict):
        assert set(value) == {"shape", "dtype", "device"}, value
        assert all(isinstance(d, int) for d in value["shape"])
        assert isinstance(value["dtype"], str) and isinstance(value["device"], str)
    elif isinstance(value, list):
        for v in value:
            _check_state_value(v)
    else:
        assert value is None or isinstance(value, (int, float)), value


def check_schema(obj: Any) -> None:
    """The ``inspect --json`` object of DESIGN.md (extra keys allowed)."""
    assert isinstance(obj["path"], str)
    assert obj["format"] in {"torch", "torch-legacy", "safetensors", "dcp"}
    assert isinstance(obj["optimizers"], list) and obj["optimizers"]
    for opt in obj["optimizers"]:
        assert isinstance(opt["key"], str)
        assert opt["optimizer"] is None or isinstance(opt["optimizer"], str)
        assert opt["names_source"] in {
            "keys",
            "param_names",
            "layout",
            "model config",
            "recovered",
            None,
        }
        for index, group in enumerate(opt["param_groups"]):
            assert group["index"] == index
            assert isinstance(group["num_params"], int)
            assert isinstance(group["hyperparams"], dict) and "params" not in group["hyperparams"]
        for param in opt["params"]:
            # an ID, or for name-keyed state (and its orphans' keys) a name
            assert isinstance(param["id"], int) or (
                opt["names_source"] == "keys" and isinstance(param["id"], str)
            )
            assert param["name"] is None or isinstance(param["name"], str)
            assert param["group"] is None or isinstance(param["group"], int)
            assert isinstance(param["state"], dict)
            for value in param["state"].values():
                _check_state_value(value)
        totals = opt["totals"]
        for key in ("params", "params_with_state", "numel", "bytes"):
            assert isinstance(totals[key], int)
        assert all(isinstance(w, str) for w in opt["warnings"])
    for companion in obj["companions"]:
        assert isinstance(companion["key"], str)
        assert companion["kind"] in {"lr_scheduler", "grad_scaler", "trainer"}
        assert companion["class"] is None or isinstance(companion["class"], str)
        assert isinstance(companion["summary"], dict)
        if companion["kind"] == "lr_scheduler":
            assert {"last_epoch", "step_count", "last_lrs"} <= set(companion["summary"])
        if companion["kind"] == "trainer":
            assert {"global_step", "epoch"} <= set(companion["summary"])
    json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------- reports of real optimizers


@pytest.mark.parametrize("case", list(CASES))
def test_report_matches_the_torch_state_dict(tmp_path: Path, case: str) -> None:
    model, optimizer = _trained(case)
    sd = optimizer.state_dict()
    path = _saved(tmp_path, {"model": model.state_dict(), "optimizer": sd})
    report = inspect_checkpoint(path)
    assert report.format == "torch"
    assert report.top_level_keys == ["model", "optimizer"]
    (opt,) = report.optimizers
    assert opt.key == "optimizer"
    assert opt.guess.name == type(optimizer).__name__
    assert opt.totals() == _expected_totals(sd)
    assert opt.by_dtype() == _expected_by_dtype(sd)

    assert len(opt.groups) == len(sd["param_groups"])
    for group, saved in zip(opt.groups, sd["param_groups"]):
        assert group.num_params == len(saved["params"])
        assert group.params_with_state == sum(1 for i in saved["params"] if sd["state"].get(i))
        assert group.hyperparams == {
            k: v for k, v in saved.items() if k not in ("params", "param_names")
        }

    names = {
        i: n for g in sd["param_groups"] for i, n in zip(g["params"], g.get("param_names", []))
    }
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert [p.id for p in opt.params] == ids
    if names:
        assert [p.name for p in opt.params] == [names.get(i) for i in ids]
        assert opt.names_source == "param_names"
    else:
        # no param_names: recovered from the model weights saved beside the optimizer; the
        # optimizer was built from model.parameters(), so ID i is the i-th named parameter
        model_names = [n for n, _ in model.named_parameters()]
        assert [p.name for p in opt.params] == [model_names[i] for i in ids]
        assert opt.names_source == "recovered"
    for p in opt.params:
        assert set(p.state) == {str(k) for k in sd["state"].get(p.id, {})}
        for key, value in sd["state"].get(p.id, {}).items():
            if isinstance(value, torch.Tensor):
                info = p.state[key]
                assert info.shape == tuple(value.shape)
                assert info.dtype == str(value.dtype).removeprefix("torch.")
                assert info.device == "cpu"

    as_json = report.to_json()
    check_schema(as_json)
    assert as_json["optimizers"][0]["optimizer"] == type(optimizer).__name__
    assert {k: v for k, v in as_json["optimizers"][0]["totals"].items() if k != "by_dtype"} == (
        _expected_totals(sd)
    )


def test_names_come_from_named_parameters(tmp_path: Path) -> None:
    model, optimizer = _trained("AdamW")
    report = inspect_checkpoint(_saved(tmp_path, optimizer.state_dict()))
    (opt,) = report.optimizers
    assert opt.key == ""
    assert sorted(p.name for p in opt.params) == sorted(n for n, _ in model.named_parameters())


def test_name_keyed_state_is_named_by_its_keys(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, optimizer = _trained("SGD")  # no param_names
    keyed = get_optimizer_state_dict(model, optimizer)  # state and params keyed by FQN
    report = inspect_checkpoint(_saved(tmp_path, {"optimizer": keyed}))
    (opt,) = report.optimizers
    assert opt.names_source == "keys"
    assert [p.id for p in opt.params] == [n for n, _ in model.named_parameters()]
    assert [p.name for p in opt.params] == [p.id for p in opt.params]
    check_schema(report.to_json())


def test_clean_checkpoint_has_no_warnings(tmp_path: Path) -> None:
    _, optimizer = _trained("AdamW")
    (opt,) = inspect_checkpoint(_saved(tmp_path, optimizer.state_dict())).optimizers
    assert opt.warnings == []
    assert inspect_checkpoint(FIXTURES / "adamw_train.pt").optimizers[0].warnings == []


# --------------------------------------------------------------------------- warnings


def _adam_sd() -> dict[str, Any]:
    model = _model()
    optimizer = torch.optim.Adam(model.named_parameters())
    _train(model, optimizer)
    return optimizer.state_dict()


def test_state_under_an_id_in_no_group(tmp_path: Path) -> None:
    sd = _adam_sd()
    sd["state"][99] = {
        "step": torch.tensor(2.0),
        "exp_avg": torch.zeros(3),
        "exp_avg_sq": torch.zeros(3),
    }
    (opt,) = inspect_checkpoint(_saved(tmp_path, sd)).optimizers
    orphan = opt.params[-1]
    assert (orphan.id, orphan.group, orphan.name) == (99, None, None)
    assert opt.totals() == _expected_totals(sd)  # the orphan is no parameter, but its bytes count
    (warning,) = opt.warnings
    assert "99" in warning and "no param group" in warning


def test_parameter_without_state(tmp_path: Path) -> None:
    model = _model()
    model.unused = nn.Parameter(torch.ones(3))  # requires_grad, but never gets a gradient
    optimizer = torch.optim.Adam(model.named_parameters())
    _train(model, optimizer)
    sd = optimizer.state_dict()
    assert model.unused.grad is None
    (opt,) = inspect_checkpoint(_saved(tmp_path, sd)).optimizers
    totals = opt.totals()
    assert (
        totals["params_with_state"]
        == totals["params"] - 1
        == _expected_totals(sd)["params_with_state"]
    )
    (warning,) = opt.warnings
    assert "unused" in warning and "1 of 7 parameters have no state" in warning


def test_step_counts_that_disagree_within_a_group(tmp_path: Path) -> None:
    sd = _adam_sd()
    sd["state"][0]["step"] = torch.tensor(5.0)
    (opt,) = inspect_checkpoint(_saved(tmp_path, sd)).optimizers
    assert opt.steps[0] == 5.0 and opt.steps[1] == 2.0
    (warning,) = opt.warnings
    assert warning.startswith("group 0: step counts disagree")
    assert "2 (5 params)" in warning and "5 (1 params)" in warning


def test_step_counts_may_differ_between_groups(tmp_path: Path) -> None:
    sd = _adam_sd()
    sd["param_groups"] = [
        {**sd["param_groups"][0], "params": [0, 1, 2]},
        {**sd["param_groups"][0], "params": [3, 4, 5]},
    ]
    for i in (3, 4, 5):
        sd["state"][i]["step"] = torch.tensor(7.0)
    (opt,) = inspect_checkpoint(_saved(tmp_path, sd)).optimizers
    assert opt.warnings == []


def test_state_tensor_of_the_wrong_shape(tmp_path: Path) -> None:
    sd = _adam_sd()
    names = dict(zip(sd["param_groups"][0]["params"], sd["param_groups"][0]["param_names"]))
    shape = tuple(sd["state"][0]["exp_avg"].shape)
    sd["state"][0]["exp_avg_sq"] = torch.zeros(3, 3)
    (opt,) = inspect_checkpoint(_saved(tmp_path, sd)).optimizers
    (warning,) = opt.warnings
    assert warning.startswith(f"{names[0]}: state tensors disagree in shape")
    assert f"exp_avg {list(shape)}" in warning and "exp_avg_sq [3, 3]" in warning


def test_python_number_steps_of_the_legacy_fixture() -> None:
    report = inspect_checkpoint(FIXTURES / "legacy_adam.pt")
    assert report.format == "torch-legacy"
    (opt,) = report.optimizers
    assert opt.guess.name == "Adam"
    assert all(isinstance(p.state["step"], int) for p in opt.params)
    assert set(opt.steps.values()) == {2.0}  # the recipe trains for 2 steps
    (warning,) = opt.warnings
    assert "6 parameters store step as a Python number" in warning


def test_saved_devices_of_the_cuda_fixture() -> None:
    (opt,) = inspect_checkpoint(FIXTURES / "cuda_adam.pt").optimizers
    for p in opt.params:
        assert p.state["exp_avg"].device == p.state["exp_avg_sq"].device == "cuda:0"
        assert p.state["step"].device == "cpu"


def test_key_selects_one_optimizer() -> None:
    report = inspect_checkpoint(FIXTURES / "lightning.ckpt", key="optimizer_states.0")
    assert [o.key for o in report.optimizers] == ["optimizer_states.0"]
    with pytest.raises(UsageError):
        inspect_checkpoint(FIXTURES / "lightning.ckpt", key="optimizer")


# --------------------------------------------------------------------------- --stats


def _planted(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    sd = _adam_sd()
    sd["state"][0]["exp_avg_sq"].view(-1)[3] = float("nan")
    sd["state"][0]["exp_avg"].view(-1)[:2] = torch.tensor([float("inf"), -float("inf")])
    sd["state"][1]["exp_avg"].fill_(float("nan"))  # nothing finite at all
    return _saved(tmp_path, sd), sd


def _check_all_stats(path: Path, sd: Mapping[str, Any]) -> None:
    (opt,) = inspect_checkpoint(path, stats=True).optimizers
    for p in opt.params:
        raw = sd["state"][p.id]
        with_values = {k for k, v in raw.items() if isinstance(v, torch.Tensor) and v.numel() > 1}
        assert set(p.stats) == with_values
        for key in with_values:
            _assert_stats(p.stats[key], raw[key])


def test_stats_equal_torch_norms_and_count_non_finite(tmp_path: Path) -> None:
    path, sd = _planted(tmp_path)
    _check_all_stats(path, sd)
    (opt,) = inspect_checkpoint(path, stats=True).optimizers
    assert opt.params[0].stats["exp_avg_sq"].nonfinite == 1
    assert opt.params[0].stats["exp_avg"].nonfinite == 2
    assert opt.params[1].stats["exp_avg"].min is None
    assert opt.picture == "exp_avg_sq"


@pytest.mark.parametrize("chunk", [1, 5, 7])
def test_stats_in_chunks_smaller_than_the_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    path, sd = _planted(tmp_path)
    assert max(t.numel() for t in tensors_of(sd["state"])) > 3 * chunk
    monkeypatch.setattr(inspect_module, "_CHUNK", chunk)
    _check_all_stats(path, sd)


def test_stats_of_complex_state(tmp_path: Path) -> None:
    param = nn.Parameter(torch.randn(3, 4, dtype=torch.complex64))
    optimizer = torch.optim.Adam([param], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        param.abs().square().sum().backward()
        optimizer.step()
    sd = optimizer.state_dict()
    assert sd["state"][0]["exp_avg"].is_complex()
    _check_all_stats(_saved(tmp_path, sd), sd)


def test_without_stats_no_value_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _planted(tmp_path)

    def refuse(tensor: torch.Tensor) -> None:
        raise AssertionError("read tensor values without --stats")

    monkeypatch.setattr(inspect_module, "tensor_stats", refuse)
    (opt,) = inspect_checkpoint(path).optimizers
    assert all(not p.stats for p in opt.params)
    assert opt.picture is None


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    "relative",
    [
        "adamw_train.pt",
        "adamw_train.safetensors",
        "sgd_momentum_bare.pt",
        "lightning.ckpt",
        "hf_trainer/checkpoint-2",
        "legacy_adam.pt",
        "cuda_adam.pt",
    ],
)
def test_json_of_every_fixture_fits_the_schema(relative: str) -> None:
    obj = inspect_checkpoint(FIXTURES / relative, stats=True).to_json()
    check_schema(obj)
    assert obj["path"] == str(FIXTURES / relative)


def test_json_with_non_finite_hyperparameters_and_steps(tmp_path: Path) -> None:
    path, sd = _planted(tmp_path)
    sd["param_groups"][0].update(lr=float("nan"), betas=(float("inf"), 0.999), eps=-float("inf"))
    sd["state"][2]["step"] = torch.tensor(float("nan"))
    sd["state"][3]["step"] = torch.tensor(float("inf"))
    torch.save(sd, path)
    obj = inspect_checkpoint(path, stats=True).to_json()
    check_schema(obj)
    text = json.dumps(obj, allow_nan=False)
    hyper = json.loads(text)["optimizers"][0]["param_groups"][0]["hyperparams"]
    assert hyper["lr"] == "nan" and hyper["betas"] == ["inf", 0.999] and hyper["eps"] == "-inf"


def test_json_state_entries_follow_the_state_dict(tmp_path: Path) -> None:
    _, optimizer = _trained("LBFGS")
    sd = optimizer.state_dict()
    obj = inspect_checkpoint(_saved(tmp_path, sd)).to_json()
    check_schema(obj)
    state = obj["optimizers"][0]["params"][0]["state"]
    for key, value in sd["state"][0].items():
        if isinstance(value, torch.Tensor):
            assert state[key] == {"shape": list(value.shape), "dtype": "float32", "device": "cpu"}
        elif isinstance(value, list):
            assert state[key] == [
                None
                if item is None
                else {"shape": list(item.shape), "dtype": "float32", "device": "cpu"}
                for item in value
            ]
        else:
            assert state[key] == value
