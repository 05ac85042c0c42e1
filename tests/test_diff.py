"""diff: structural and numeric differences between optimizer state dicts, found independently."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import optckpt.diff_values as diff_values
from optckpt.diff import diff_checkpoints
from optckpt.diff_values import count_differing
from optckpt.errors import UsageError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _state_dict(named: bool = True) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    params = list(model.named_parameters()) if named else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
    return opt.state_dict()


def _kinds(
    a: dict[str, Any], b: dict[str, Any], tmp_path: Path, **kwargs: Any
) -> list[tuple[str, str]]:
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    report = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", **kwargs)
    json.dumps(report.to_json(), allow_nan=False)
    assert report.to_json()["ok"] is report.ok
    return [(d.kind, d.where) for p in report.pairs for d in p.differences]


def test_identical_copies(tmp_path: Path) -> None:
    sd = _state_dict()
    assert _kinds(sd, copy.deepcopy(sd), tmp_path) == []


def test_one_flipped_bit_is_a_difference(tmp_path: Path) -> None:
    a = _state_dict()
    b = copy.deepcopy(a)
    bits = b["state"][0]["exp_avg"].view(torch.int32)
    bits.view(-1)[3] ^= 1
    assert _kinds(a, b, tmp_path) == [("values", "0.weight.exp_avg")]
    # within tolerance it is not
    assert _kinds(a, b, tmp_path, rtol=1e-5) == []


def test_nan_with_same_bits_is_equal_and_negative_zero_is_not(tmp_path: Path) -> None:
    a = _state_dict()
    a["state"][0]["exp_avg"].view(-1)[0] = float("nan")
    b = copy.deepcopy(a)
    assert _kinds(a, b, tmp_path) == []
    a["state"][0]["exp_avg"].view(-1)[1] = 0.0
    b["state"][0]["exp_avg"].view(-1)[1] = -0.0
    assert _kinds(a, b, tmp_path) == [("values", "0.weight.exp_avg")]
    assert _kinds(a, b, tmp_path, atol=0.0, rtol=0.0) == []


def test_value_statistics_match_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diff_values, "_CHUNK", 5)  # several chunks on a small tensor
    a = _state_dict()
    b = copy.deepcopy(a)
    b["state"][0]["exp_avg_sq"] *= 1.5
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    [d] = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt").pairs[0].differences
    x, y = a["state"][0]["exp_avg_sq"].double(), b["state"][0]["exp_avg_sq"].double()
    differs = x != y
    assert d.detail["differing"] == int(differs.sum())
    assert d.detail["numel"] == x.numel()
    assert d.detail["max_abs"] == pytest.approx(float((x - y).abs().max()))
    assert d.detail["max_rel"] == pytest.approx(float(((x - y).abs() / y.abs())[differs].max()))


def test_structure(tmp_path: Path) -> None:
    a = _state_dict()
    b = copy.deepcopy(a)
    b["param_groups"][0]["lr"] = 5e-4
    b["state"][1]["step"] = torch.tensor(9.0)
    b["state"][2]["exp_avg"] = b["state"][2]["exp_avg"].double()
    b["state"][3]["exp_avg_sq"] = torch.zeros(3)
    del b["state"][4]["exp_avg"]
    b["state"][5]["extra"] = torch.ones(1)
    assert sorted(_kinds(a, b, tmp_path)) == sorted(
        [
            ("hyperparam", "group 0.lr"),
            ("step", "0.bias.step"),
            ("dtype", "1.weight.exp_avg"),
            ("shape", "1.bias.exp_avg_sq"),
            ("state_key_removed", "2.weight.exp_avg"),
            ("state_key_added", "2.bias.extra"),
        ]
    )


def test_params_added_and_removed_by_name(tmp_path: Path) -> None:
    a = _state_dict()
    b = copy.deepcopy(a)
    b["param_groups"][0]["param_names"][5] = "head.bias"
    assert sorted(_kinds(a, b, tmp_path)) == [
        ("param_added", "head.bias"),
        ("param_removed", "2.bias"),
    ]


def test_without_names_params_match_by_id(tmp_path: Path) -> None:
    a = _state_dict(named=False)
    b = copy.deepcopy(a)
    b["param_groups"][0]["params"].append(6)
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    report = diff_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt")
    assert report.pairs[0].match_by == "id"
    assert sorted((d.kind, d.where) for d in report.pairs[0].differences) == [
        ("group_size", "group 0"),
        ("param_added", "ID 6"),
    ]


def test_formats_compare_equal() -> None:
    assert diff_checkpoints(FIXTURES / "adamw_train.pt", FIXTURES / "adamw_train.safetensors").ok


def test_legacy_python_step_differs_from_tensor_step(tmp_path: Path) -> None:
    a = _state_dict()
    b = copy.deepcopy(a)
    b["state"][0]["step"] = int(b["state"][0]["step"].item())
    assert _kinds(a, b, tmp_path) == [("step", "0.weight.step")]


def test_pairing(tmp_path: Path) -> None:
    sd = _state_dict()
    torch.save({"optimizer_states": [sd, sd]}, tmp_path / "two.pt")
    torch.save({"optimizer_states": [sd, sd]}, tmp_path / "two_b.pt")
    assert len(diff_checkpoints(tmp_path / "two.pt", tmp_path / "two_b.pt").pairs) == 2
    torch.save(sd, tmp_path / "one.pt")
    with pytest.raises(UsageError, match="--key-a"):
        diff_checkpoints(tmp_path / "two.pt", tmp_path / "one.pt")
    report = diff_checkpoints(tmp_path / "two.pt", tmp_path / "one.pt", key_a="optimizer_states.1")
    assert report.ok


def test_negative_tolerance_is_refused() -> None:
    with pytest.raises(UsageError):
        diff_checkpoints(FIXTURES / "adamw_train.pt", FIXTURES / "adamw_train.pt", atol=-1.0)


def test_with_a_tolerance_values_of_different_dtypes_are_compared(tmp_path: Path) -> None:
    a = _state_dict()
    b = copy.deepcopy(a)
    b["state"][0]["exp_avg"] = b["state"][0]["exp_avg"].bfloat16()
    assert _kinds(a, b, tmp_path) == [("dtype", "0.weight.exp_avg")]
    # bfloat16 keeps 8 bits of mantissa: within rtol 1e-2, but not within 1e-5
    assert _kinds(a, b, tmp_path, rtol=1e-2) == [("dtype", "0.weight.exp_avg")]
    assert _kinds(a, b, tmp_path, rtol=1e-5) == [
        ("dtype", "0.weight.exp_avg"),
        ("values", "0.weight.exp_avg"),
    ]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # equal bits, whatever the values: NaNs with the same payload are equal
        (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]), 0),
        (torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), 1),  # -0.0 differs bitwise
        (torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]), 1),  # integers by value
        (torch.tensor([True, False]), torch.tensor([True, False]), 0),
        (torch.arange(12.0).view(3, 4).t(), torch.arange(12.0).view(3, 4).t(), 0),  # views
        (torch.arange(12.0).view(3, 4).t(), torch.arange(12.0).view(3, 4).t() + 1, 12),
        (torch.randn(3, dtype=torch.bfloat16), None, 0),
        (torch.tensor(2.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64), 1),
    ],
)
def test_fast_equality_agrees_with_the_element_count(
    a: torch.Tensor, b: torch.Tensor | None, expected: int
) -> None:
    b = a.clone() if b is None else b
    assert count_differing(a, b, None)[0] == expected
    # with a tolerance, identical bits are always close (equal_nan=True)
    if expected == 0:
        assert count_differing(a, b, (0.0, 0.0))[0] == 0


def test_nan_payloads_that_differ_are_counted(tmp_path: Path) -> None:
    a = torch.full((4,), float("nan"))
    b = a.clone()
    b.view(torch.int32)[2] ^= 1  # another NaN, other bits
    assert count_differing(a, b, None)[0] == 1
    assert count_differing(a, b, (0.0, 0.0))[0] == 0  # both NaN: close


# --------------------------------------------------------------------------- bytes, no tensors

_SAME_OPTIMIZER = [
    "adamw_train.pt",
    "adamw_train.safetensors",
    "regenerated/adamw.pt",
    "regenerated/adamw_betas.safetensors",
    "cuda_adam.pt",
    "legacy_adam.pt",
    "lightning.ckpt",
    "regenerated/lbfgs.pt",
]


@pytest.mark.parametrize("a", _SAME_OPTIMIZER)
@pytest.mark.parametrize("b", _SAME_OPTIMIZER)
def test_bitwise_diff_from_bytes_reports_what_tensors_report(a: str, b: str) -> None:
    """Files described and compared byte for byte, or loaded by torch: the same report."""

    def report(describe: bool) -> str:
        try:
            found = diff_checkpoints(FIXTURES / a, FIXTURES / b, describe=describe)
            return json.dumps(found.to_json())
        except UsageError as e:
            return f"UsageError: {e}"

    assert report(True) == report(False)


def test_changed_bytes_found_in_a_view_and_in_a_whole_storage(tmp_path: Path) -> None:
    sd = _state_dict()
    # a view that is not contiguous (the same values, transposed twice): compared by value
    last = sd["state"][4]["exp_avg"]
    assert last.dim() == 2
    sd["state"][4]["exp_avg"] = last.t().contiguous().t()
    base = tmp_path / "a.pt"
    torch.save(sd, base)
    changed = copy.deepcopy(sd)
    changed["state"][0]["exp_avg"][0, 0] = torch.nextafter(
        changed["state"][0]["exp_avg"][0, 0], torch.tensor(1.0)
    )
    other = tmp_path / "b.pt"
    torch.save(changed, other)
    ours = diff_checkpoints(base, other, describe=True).to_json()
    assert ours == diff_checkpoints(base, other, describe=False).to_json()
    values = [d for d in ours["pairs"][0]["differences"] if d["kind"] == "values"]
    assert [d["where"] for d in values] == ["0.weight.exp_avg"]
    assert values[0]["differing"] == 1


def test_identical_files_compared_without_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    copy_ = tmp_path / "copy.pt"
    copy_.write_bytes((FIXTURES / "adamw_train.pt").read_bytes())
    script = (
        "import sys\nfrom optckpt.diff import diff_checkpoints\n"
        f"r = diff_checkpoints({str(FIXTURES / 'adamw_train.pt')!r}, {str(copy_)!r})\n"
        "print(r.ok, 'torch' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert found.stdout.split() == ["True", "False"], found.stdout + found.stderr
